"""Sample manifests and the table of invalid ones, shared by the unit tests (pydantic) and the integration
tests (the real API server), so both layers are held to the same cases."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(path: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / path).read_text())


def finetune(name: str = "ft") -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": name},
        "spec": {
            "baseModel": {"source": "Qwen/Qwen2.5-7B-Instruct"},
            "template": "qwen",
            "dataset": {"train": {"uri": "s3://bucket/viggo/train.jsonl"}},
            "resources": {"workers": 2, "gpusPerWorker": 1, "accelerator": "L4", "cpusPerWorker": 4,
                          "memoryPerWorker": "16Gi"},
            "output": {"uri": "s3://bucket/adapters/" + name},
        },
    }


def batchinference(name: str = "bi", fine_tune: str | None = None) -> dict[str, Any]:
    model = {"fineTuneRef": {"name": fine_tune}} if fine_tune else {"source": "Qwen/Qwen2.5-7B-Instruct"}
    return {
        "apiVersion": "llmops.dev/v1alpha1", "kind": "BatchInference", "metadata": {"name": name},
        "spec": {
            "model": model,
            "input": {"uri": "s3://bucket/viggo/test.jsonl"},
            "prompt": {"systemPrompt": "Build the meaning representation.", "userField": "input"},
            "resources": {"workers": 1, "gpusPerWorker": 1, "accelerator": "L4", "cpusPerWorker": 4,
                          "memoryPerWorker": "16Gi"},
            "output": {"uri": "s3://bucket/viggo/out-" + name},
            "evaluation": {"referenceField": "output", "metrics": ["exactMatch", "attributeF1"]},
        },
    }


def llmservice(name: str = "svc", adapters: list[dict] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "modelId": "ft-model",
        "model": {"source": "Qwen/Qwen2.5-7B-Instruct"},
        "resources": {"workers": 1, "gpusPerWorker": 1, "accelerator": "L4", "cpusPerWorker": 4,
                      "memoryPerWorker": "16Gi"},
    }
    if adapters is not None:
        spec["adapters"] = adapters
    return {"apiVersion": "llmops.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": name}, "spec": spec}


def _edit(base: Callable[[], dict], change: Callable[[dict], None]) -> dict[str, Any]:
    doc = copy.deepcopy(base())
    change(doc["spec"])
    return doc


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(spec: dict) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return change


def _drop(path: str) -> Callable[[dict], None]:
    def change(spec: dict) -> None:
        *parents, leaf = path.split(".")
        node = spec
        for p in parents:
            node = node[p]
        del node[leaf]
    return change


# (id, manifest, text the API server's message must contain: the field path)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("ft-no-base-model", _edit(finetune, _drop("baseModel")), "spec.baseModel"),
    ("ft-no-template", _edit(finetune, _drop("template")), "spec.template"),
    ("ft-no-output", _edit(finetune, _drop("output")), "spec.output"),
    ("ft-no-train-data", _edit(finetune, _drop("dataset.train")), "spec.dataset.train"),
    ("ft-bad-source", _edit(finetune, _set("baseModel.source", "ftp://host/model")), "spec.baseModel.source"),
    ("ft-bad-output-scheme", _edit(finetune, _set("output.uri", "http://bucket/x")), "spec.output.uri"),
    ("ft-bad-train-scheme", _edit(finetune, _set("dataset.train.uri", "/local/file.json")), "spec.dataset.train.uri"),
    ("ft-rank-too-big", _edit(finetune, _set("method.rank", 512)), "spec.method.rank"),
    ("ft-rank-zero", _edit(finetune, _set("method.rank", 0)), "spec.method.rank"),
    ("ft-bad-method", _edit(finetune, _set("method.type", "dpo")), "spec.method.type"),
    ("ft-dropout-above-one", _edit(finetune, _set("method.dropout", 1.5)), "spec.method.dropout"),
    ("ft-bad-format", _edit(finetune, _set("dataset.format", "csv")), "spec.dataset.format"),
    ("ft-bad-precision", _edit(finetune, _set("training.precision", "int8")), "spec.training.precision"),
    ("ft-negative-lr", _edit(finetune, _set("training.learningRate", -0.1)), "spec.training.learningRate"),
    ("ft-zero-epochs", _edit(finetune, _set("training.epochs", 0)), "spec.training.epochs"),
    ("ft-zero-workers", _edit(finetune, _set("resources.workers", 0)), "spec.resources.workers"),
    ("ft-bad-memory", _edit(finetune, _set("resources.memoryPerWorker", "lots")), "spec.resources.memoryPerWorker"),
    ("ft-bad-placement", _edit(finetune, _set("resources.placementStrategy", "ANYWHERE")),
     "spec.resources.placementStrategy"),
    ("ft-unknown-field", _edit(finetune, _set("learningRate", 0.1)), "learningRate"),
    ("ft-secret-as-value", _edit(finetune, _set("secrets.huggingFaceToken", {"value": "hf_abc"})),
     "spec.secrets.huggingFaceToken"),
    ("ft-cutoff-too-small", _edit(finetune, _set("dataset.cutoffLen", 4)), "spec.dataset.cutoffLen"),
    ("ft-bad-scheduler", _edit(finetune, _set("training.lrScheduler", "sawtooth")), "spec.training.lrScheduler"),
    ("ft-shared-prefix-fa2", _edit(finetune, _set("training", {"sharedPrefix": True, "attention": "fa2"})),
     "sharedPrefix"),
    ("ft-shared-prefix-unpacked", _edit(finetune, _set("training", {"sharedPrefix": True, "packing": False})),
     "sharedPrefix"),
    ("bi-no-model", _edit(batchinference, _set("model", {})), "spec.model"),
    ("bi-two-models", _edit(batchinference, _set("model.fineTuneRef", {"name": "ft"})), "spec.model"),
    ("bi-adapter-without-source",
     _edit(lambda: batchinference(fine_tune="ft"), _set("model.adapter", {"uri": "s3://b/a"})), "spec.model"),
    ("bi-two-system-prompts", _edit(batchinference, _set("prompt.systemField", "instruction")), "spec.prompt"),
    ("bi-bad-input-format", _edit(batchinference, _set("input.format", "xml")), "spec.input.format"),
    ("bi-bad-metric", _edit(batchinference, _set("evaluation.metrics", ["bleu"])), "spec.evaluation.metrics"),
    ("bi-temperature-too-high", _edit(batchinference, _set("sampling.temperature", 5)),
     "spec.sampling.temperature"),
    ("bi-top-p-zero", _edit(batchinference, _set("sampling.topP", 0)), "spec.sampling.topP"),
    ("bi-not-enough-gpus", _edit(batchinference, _set("engine.tensorParallelSize", 4)), "spec.resources"),
    ("bi-bad-ref-name", _edit(lambda: batchinference(fine_tune="ft"), _set("model.fineTuneRef.name", "Bad_Name")),
     "spec.model.fineTuneRef.name"),
    ("bi-no-reference-field", _edit(batchinference, _set("evaluation", {"metrics": ["exactMatch"]})),
     "spec.evaluation.referenceField"),
    ("llms-no-model-id", _edit(llmservice, _drop("modelId")), "spec.modelId"),
    ("llms-min-above-max", _edit(llmservice, _set("autoscaling", {"minReplicas": 3, "maxReplicas": 2})),
     "spec.autoscaling"),
    ("llms-scale-to-zero-delay-without-zero",
     _edit(llmservice, _set("autoscaling", {"minReplicas": 1, "maxReplicas": 2, "scaleToZeroDelaySeconds": 300})),
     "spec.autoscaling.scaleToZeroDelaySeconds"),
    ("llms-adapter-two-sources",
     _edit(llmservice, _set("adapters", [{"name": "a", "uri": "s3://b/a", "fineTuneRef": {"name": "ft"}}])),
     "spec.adapters[0]"),
    ("llms-adapter-no-source", _edit(llmservice, _set("adapters", [{"name": "a"}])), "spec.adapters[0]"),
    ("llms-duplicate-adapters",
     _edit(llmservice, _set("adapters", [{"name": "a", "uri": "s3://b/a"}, {"name": "a", "uri": "s3://b/b"}])),
     "spec.adapters"),
    ("llms-gate-above-one",
     _edit(llmservice, _set("adapters", [{"name": "a", "uri": "s3://b/a",
                                          "gate": {"batchInferenceRef": {"name": "bi"}, "minimum": 1.5}}])),
     "spec.adapters[0].gate.minimum"),
    ("llms-bad-upgrade", _edit(llmservice, _set("upgradeStrategy", "Rolling")), "spec.upgradeStrategy"),
    ("llms-bad-lora-path", _edit(llmservice, _set("lora.dynamicLoadingPath", "pvc://claim/adapters")),
     "spec.lora.dynamicLoadingPath"),
    ("llms-max-rank-too-big", _edit(llmservice, _set("lora.maxRank", 1024)), "spec.lora.maxRank"),
    ("llms-bad-routing", _edit(llmservice, _set("routing", "roundRobin")), "spec.routing"),
    ("llms-expose-no-gateway", _edit(llmservice, _set("expose", {"hostnames": ["llm.example.com"]})),
     "spec.expose.gateway"),
    ("llms-expose-bad-hostname", _edit(llmservice, _set("expose", {"gateway": {"name": "gw"},
                                                                   "hostnames": ["LLM_host:443"]})),
     "spec.expose.hostnames[0]"),
    ("llms-api-key-no-secret", _edit(llmservice, _set("expose", {"gateway": {"name": "gw"}, "apiKey": {}})),
     "spec.expose.apiKey.secretRef"),
    ("llms-api-key-unknown-enforcement",
     _edit(llmservice, _set("expose", {"gateway": {"name": "gw"},
                                       "apiKey": {"secretRef": {"name": "keys"}, "enforcement": "Istio"}})),
     "spec.expose.apiKey.enforcement"),
]
