"""`llmops render`: every object the operator would create for some manifests, without a cluster.

References between resources in the same input are resolved as if each FineTune had finished and written
its adapter to its spec.output.uri, so a whole workflow renders in one go. With ``assume_ready`` the LLMService
is rendered as it will be once its gates passed too (every gate's evaluation Ready at its minimum), so the
adapters it will serve, and their `lora_config`, appear.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from .api import API_VERSION, KINDS
from .api.batchinference import BatchInferenceSpec, BatchInferenceStatus
from .api.finetune import FineTuneSpec, FineTuneStatus
from .api.llmservice import LLMServiceSpec
from .api.validation import spec_errors
from .builders import batchinference, finetune, llmservice, modelcache
from .builders.common import BuildContext, Owner
from .builders.serving import EVALUATED_ADAPTER_KEY, resolve_adapters
from .dependencies import finetune_output
from .handlers.kinds import RECONCILERS
from .settings import Settings


def _with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("namespace", "default")
    # A stable uid per name keeps the output reproducible (golden files diff it).
    key = f"{doc.get('kind')}/{meta['namespace']}/{meta.get('name')}"
    meta.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, key)))
    meta.setdefault("generation", 1)
    return {**doc, "metadata": meta}


def planned_finetune_status(doc: dict[str, Any]) -> FineTuneStatus:
    spec = FineTuneSpec.model_validate(doc["spec"])
    return FineTuneStatus.read({
        "phase": "Succeeded", "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}],
        "adapter": {"uri": spec.output.uri, "baseModel": spec.base_model.source, "rank": spec.method.rank}})


def planned_gate_statuses(spec: LLMServiceSpec, finetunes: dict[str, dict]) -> dict[str, BatchInferenceStatus]:
    """BatchInference statuses under which every gate of `spec` passes: each evaluation Ready, reporting its
    gate's minimum for the adapter it guards."""
    statuses: dict[str, dict[str, Any]] = {}
    for adapter in spec.adapters or []:
        gate = adapter.gate
        if gate is None:
            continue
        uri = adapter.uri
        if uri is None and adapter.fine_tune_ref.name in finetunes:
            uri = FineTuneSpec.model_validate(finetunes[adapter.fine_tune_ref.name]["spec"]).output.uri
        status = statuses.setdefault(gate.batch_inference_ref.name, {
            "phase": "Succeeded", "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}],
            "metrics": {}})
        status["metrics"][gate.metric] = max(gate.minimum, status["metrics"].get(gate.metric, gate.minimum))
        if uri:
            status[EVALUATED_ADAPTER_KEY] = uri
    return {name: BatchInferenceStatus.read(status) for name, status in statuses.items()}


def render_manifests(docs: list[dict[str, Any]], ctx: BuildContext | None = None, *, assume_ready: bool = False
                     ) -> tuple[list[dict], list[str]]:
    if ctx is None:
        from .builders.common import load_payloads
        ctx = BuildContext(settings=Settings.load(), payloads=load_payloads())
    docs = [_with_defaults(d) for d in docs if d.get("apiVersion") == API_VERSION and d.get("kind") in KINDS]
    finetunes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "FineTune"}
    objects: list[dict] = []
    errors: list[str] = []
    seen: set[tuple[str, str, str]] = set()   # a shared object (the payload sources) once per namespace
    for doc in docs:
        where = f"{doc['kind']} {doc['metadata']['namespace']}/{doc['metadata'].get('name')}"
        try:
            for obj in _render_one(doc, finetunes, ctx, assume_ready):
                key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
                if key not in seen:
                    seen.add(key)
                    objects.append(obj)
        except ValidationError as e:
            errors.append(f"{where}: {spec_errors(e)}")
        except (KeyError, ValueError) as e:
            errors.append(f"{where}: {e}")
    return objects, errors


@dataclass(frozen=True)
class Planned:
    """How `render` stands in for the cluster for one kind: the resources its spec names, resolved within the
    input, and the model cache its children start with."""

    references: Callable[[Any, dict[str, dict], bool], tuple[Any, ...]]   # (spec, finetunes, assume_ready)
    cached_model: Callable[..., modelcache.CachedModel | None]             # (owner, spec, *references)
    image: Callable[[Any, BuildContext], str]


def _batch_references(spec: BatchInferenceSpec, finetunes: dict[str, dict], assume_ready: bool) -> tuple[Any, ...]:
    model = batchinference.resolved_from_spec(spec)
    if model is None:
        ref = spec.model.fine_tune_ref.name
        if ref not in finetunes:
            raise KeyError(f"spec.model.fineTuneRef names FineTune {ref}, which is not in the input")
        # As the operator will once the FineTune succeeded: its planned status, read the operator's way.
        output = finetune_output(ref, planned_finetune_status(finetunes[ref]))
        ft = FineTuneSpec.model_validate(finetunes[ref]["spec"])
        model = batchinference.ResolvedModel.of_finetune(ft.base_model.source, output.uri, output.rank)
    return (model,)


def _service_references(spec: LLMServiceSpec, finetunes: dict[str, dict], assume_ready: bool) -> tuple[Any, ...]:
    statuses = {name: planned_finetune_status(d) for name, d in finetunes.items()}
    return (resolve_adapters(spec, statuses, planned_gate_statuses(spec, finetunes) if assume_ready else {}),)


PLANNED: dict[str, Planned] = {
    "FineTune": Planned(lambda spec, finetunes, ready: (), finetune.cached_model, finetune.image),
    "BatchInference": Planned(_batch_references, batchinference.cached_model, batchinference.image),
    "LLMService": Planned(_service_references, lambda owner, spec, adapters: llmservice.cached_model(owner, spec),
                          llmservice.image),
}


def _render_one(doc: dict[str, Any], finetunes: dict[str, dict], ctx: BuildContext, assume_ready: bool
                ) -> list[dict]:
    reconciler, planned = RECONCILERS[doc["kind"]], PLANNED[doc["kind"]]
    spec = reconciler.api.spec_model.model_validate(doc["spec"])
    owner = Owner.of(doc)
    references = planned.references(spec, finetunes, assume_ready)
    children = reconciler.build(owner, spec, ctx, *references)
    cached = planned.cached_model(owner, spec, *references)
    if cached is None:
        return children
    # A model cache's children first: the operator applies them, and the rest once the model is cached.
    return [*modelcache.build(owner, cached, spec, planned.image(spec, ctx), ctx), *children]
