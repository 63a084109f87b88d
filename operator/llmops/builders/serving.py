"""LLMService -> which adapters to serve, and the `serveConfigV2` that runs `ray.serve.llm:build_openai_app`.

Pure functions: the caller reads the FineTune / BatchInference statuses and passes them in.

How Ray Serve 2.60 finds a LoRA adapter (ray.llm._internal.serve.utils.lora_serve_utils): a request for
model "<model_id>:<id>" loads the folder "<lora_config.dynamic_lora_loading_path>/<id>", and /v1/models lists
every subfolder of that path holding an adapter_config.json. Hence the rules applied here:

* one loading path per model: adapters under another parent cannot be served next to the chosen one;
* the adapter's folder name IS its id, and the API promises clients "<modelId>:<adapters[].name>", so an
  adapter is served only when its folder is named after it (otherwise it is Unsupported, and the message says
  where the folder must be). Publishing the folder name instead would make `adapters[].name` a lie and change
  the ids clients use whenever an output path changes.
* gates decide what the operator publishes and whether a loading path exists at all; they are not access
  control: once the path exists, Ray Serve lists and loads every folder under it. States say when an adapter
  that is not served is still reachable that way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from ..api.batchinference import BatchInferenceStatus
from ..api.finetune import FineTuneStatus
from ..api.llmservice import SERVE_LORA_SCHEMES, Adapter, LLMServiceSpec
from .. import dependencies as deps
from .common import PVC_ROOT

SERVE_APP_NAME = "llm"
SERVE_IMPORT_PATH = "ray.serve.llm:build_openai_app"

# Ray Serve LLM's prefix-aware router (the same path in Ray 2.57 and 2.60). Ray imports it when the deployment
# starts; its module needs vLLM, so the operator only names it.
PREFIX_AFFINITY_ROUTER = "ray.serve.llm.request_router.PrefixCacheAffinityRouter"

# vLLM's LoRAConfig accepts only these max_lora_rank values; spec.lora.maxRank is rounded up to one of them.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256)
# Engine arguments the operator derives from spec.lora; extraEngineArgs may not set them.
LORA_ENGINE_ARGS = ("enable_lora", "max_lora_rank", "max_loras")

SERVING = "Serving"
WAITING_FOR_FINETUNE = "WaitingForFineTune"
WAITING_FOR_EVALUATION = "WaitingForEvaluation"
GATE_NOT_MET = "GateNotMet"
UNSUPPORTED = "Unsupported"
FAILED = "Failed"
WAITING = (WAITING_FOR_FINETUNE, WAITING_FOR_EVALUATION)

EVALUATED_ADAPTER_KEY = BatchInferenceStatus.model_fields["adapter_uri"].alias or "adapterUri"
ADAPTER_NAME = re.compile(Adapter.model_json_schema()["properties"]["name"]["pattern"])


class ServeConfigError(ValueError):
    """The spec cannot be rendered; the message says which field to change."""


@dataclass(frozen=True)
class AdapterPlan:
    dynamic_lora_loading_path: str | None
    """lora_config.dynamic_lora_loading_path; None when no adapter is served (then no lora_config)."""
    served: list[tuple[str, str]]
    """(id, uri) of every served adapter, in spec order; id == adapters[].name == the folder name, and uri is
    "<dynamic_lora_loading_path>/<id>", the folder Ray Serve loads."""
    states: list[dict[str, Any]]
    """status.adapters: {name, uri, state, message} per spec.adapters entry, in spec order."""
    models: list[str]
    """status.models: the model id, then "<modelId>:<id>" per served adapter."""
    summary: str
    """One line for the service's condition message."""


# ---- adapters -----------------------------------------------------------------------------------------------
def _split(uri: str) -> tuple[str, str]:
    """(parent, folder) of an adapter URI, trailing slashes ignored; folder is "" for a bucket root."""
    scheme, _, rest = uri.rstrip("/").partition("://")
    head, _, folder = rest.rpartition("/")
    return (f"{scheme}://{head}", folder) if head else (f"{scheme}://{rest}", "")


def _state(adapter: Adapter, uri: str | None, state: str, message: str) -> dict[str, Any]:
    return {"name": adapter.name, "uri": uri, "state": state, "message": message}


def _source(adapter: Adapter, finetunes: Mapping[str, FineTuneStatus], max_rank: int
            ) -> tuple[str | None, dict[str, Any] | None]:
    """The adapter's URI, or the state that stops it before its location is known."""
    if adapter.uri is not None:
        return adapter.uri, None
    name = adapter.fine_tune_ref.name
    if name not in finetunes:
        return None, _state(adapter, None, FAILED, f"FineTune {name} does not exist in this namespace")
    output = deps.finetune_output(name, finetunes[name])
    if output.state != deps.READY:
        return None, _state(adapter, None, WAITING_FOR_FINETUNE if output.state == deps.WAITING else FAILED,
                            output.message)
    if output.rank is not None and output.rank > max_rank:
        return output.uri, _state(adapter, output.uri, UNSUPPORTED,
                                  f"its LoRA rank {output.rank} exceeds spec.lora.maxRank {max_rank}: raise "
                                  "lora.maxRank (a new Ray cluster) or retrain with a smaller rank")
    return output.uri, None


def _location_problem(uri: str, fixed_path: str | None) -> str | None:
    if not uri.startswith(SERVE_LORA_SCHEMES):
        where = "a PersistentVolumeClaim" if uri.startswith("pvc://") else "that location"
        return (f"Ray Serve loads LoRA adapters only from {', '.join(SERVE_LORA_SCHEMES)} "
                f"(lora_config.dynamic_lora_loading_path), not from {where}: copy the adapter folder to object "
                "storage and point adapters[].uri at it (or have the FineTune write its output there)")
    parent, folder = _split(uri)
    if not folder:
        return f"{uri} is a bucket root; point it at the adapter's folder (the one holding adapter_config.json)"
    if fixed_path is not None and parent != fixed_path:
        return (f"it sits under {parent}, not directly under spec.lora.dynamicLoadingPath {fixed_path}: move it "
                f"to {fixed_path}/{folder}")
    return None


def _misnamed(model_id: str, adapter: Adapter, uri: str, path: str | None) -> str:
    parent, folder = _split(uri)
    target = f"{path or parent}/{adapter.name}"
    rename = f", or rename the adapter to {folder}" if ADAPTER_NAME.fullmatch(folder) else ""
    return (f"clients ask for {model_id}:{adapter.name} and Ray Serve loads that from {target}, but the adapter "
            f"is at {uri}: write (or copy) it to {target}{rename}")


def _gate_problem(adapter: Adapter, uri: str, batchinferences: Mapping[str, BatchInferenceStatus]
                  ) -> tuple[str, str] | None:
    gate = adapter.gate
    if gate is None:
        return None
    name = gate.batch_inference_ref.name
    if name not in batchinferences:
        return WAITING_FOR_EVALUATION, f"BatchInference {name} (the gate's evaluation) does not exist yet"
    status = batchinferences[name]
    if deps.is_failed(status):
        return WAITING_FOR_EVALUATION, deps.with_why(f"BatchInference {name} (the gate's evaluation) failed; run it "
                                                 "again", status)
    if not deps.is_ready(status):
        return WAITING_FOR_EVALUATION, deps.not_ready("BatchInference", name, status) + " (the gate waits for it)"
    evaluated = status.adapter_uri
    if evaluated and evaluated.rstrip("/") != uri.rstrip("/"):
        return WAITING_FOR_EVALUATION, (f"BatchInference {name} evaluated {evaluated}, not this adapter ({uri}); "
                                        "point a BatchInference at this adapter")
    metrics = status.metrics.wire() if status.metrics else {}   # gate.metric is a wire name
    value = metrics.get(gate.metric)
    if not isinstance(value, (int, float)):
        return GATE_NOT_MET, (f"BatchInference {name} reports no {gate.metric}; add it to its "
                              "spec.evaluation.metrics")
    if value < gate.minimum:
        rows = f" over {metrics['rows']} rows" if metrics.get("rows") else ""
        return GATE_NOT_MET, (f"{gate.metric} {value:.4g}{rows} (BatchInference {name}) is below the minimum "
                              f"{gate.minimum:g}")
    return None


def _choose_parent(candidates: list[tuple[Adapter, str]]) -> str | None:
    """The parent holding the most candidates; ties go to the one named first in spec.adapters."""
    parents = [_split(uri)[0] for _, uri in candidates]
    counts = Counter(parents)
    return max(parents, key=lambda p: (counts[p], -parents.index(p)), default=None)


def resolve_adapters(spec: LLMServiceSpec, finetunes: Mapping[str, FineTuneStatus],
                     batchinferences: Mapping[str, BatchInferenceStatus]) -> AdapterPlan:
    """Decide, per spec.adapters entry, whether it is served, and derive the one loading path.

    `finetunes` / `batchinferences` map a resource name to its `status` (a missing name: no such resource).
    """
    fixed_path = spec.lora.dynamic_loading_path.rstrip("/") if spec.lora.dynamic_loading_path else None
    states: dict[str, dict[str, Any]] = {}
    misnamed: list[tuple[Adapter, str]] = []
    candidates: list[tuple[Adapter, str]] = []
    for adapter in spec.adapters or []:
        uri, stopped = _source(adapter, finetunes, spec.lora.max_rank)
        if stopped is None and (problem := _location_problem(uri, fixed_path)):
            stopped = _state(adapter, uri, UNSUPPORTED, problem)
        if stopped is None and _split(uri)[1] != adapter.name:
            misnamed.append((adapter, uri))
            continue
        if stopped is None and (gated := _gate_problem(adapter, uri, batchinferences)):
            stopped = _state(adapter, uri, *gated)
        if stopped is not None:
            states[adapter.name] = stopped
        else:
            candidates.append((adapter, uri))

    path = fixed_path or _choose_parent(candidates)
    served: list[tuple[str, str]] = []
    for adapter, uri in candidates:
        parent = _split(uri)[0]
        if parent == path:
            served.append((adapter.name, f"{path}/{adapter.name}"))
            states[adapter.name] = _state(adapter, uri, SERVING, f"served as {spec.model_id}:{adapter.name}")
        else:
            states[adapter.name] = _state(adapter, uri, UNSUPPORTED, (
                f"it sits under {parent}, but this service loads adapters from {path} (Ray Serve takes one "
                f"dynamic_lora_loading_path per model): move it to {path}/{adapter.name}, or set "
                "spec.lora.dynamicLoadingPath to the parent you want"))
    for adapter, uri in misnamed:
        states[adapter.name] = _state(adapter, uri, UNSUPPORTED, _misnamed(spec.model_id, adapter, uri, path))
    if not served:
        path = None

    ordered = [states[a.name] for a in spec.adapters or []]
    if path is not None:
        for state in ordered:
            if state["state"] != SERVING and state["uri"] and _split(state["uri"])[0] == path:
                folder = _split(state["uri"])[1]
                state["message"] += (f" (not published, yet its folder is under {path}, so Ray Serve still lists "
                                     f"{spec.model_id}:{folder} and loads it on request)")
    return AdapterPlan(dynamic_lora_loading_path=path, served=served, states=ordered,
                       models=[spec.model_id, *(f"{spec.model_id}:{id_}" for id_, _ in served)],
                       summary=_summary(spec, ordered, served))


def _summary(spec: LLMServiceSpec, states: list[dict[str, Any]], served: list[tuple[str, str]]) -> str:
    if not states:
        return f"serving {spec.model_id} without adapters"
    parts = [f"{len(served)}/{len(states)} adapters served"
             + (f" ({', '.join(id_ for id_, _ in served)})" if served else "")]
    waiting = [f"{s['name']} ({s['state']})" for s in states if s["state"] in WAITING]
    blocked = [f"{s['name']} ({s['state']})" for s in states if s["state"] not in (SERVING, *WAITING)]
    if waiting:
        parts.append("waiting: " + ", ".join(waiting))
    if blocked:
        parts.append("not served: " + ", ".join(blocked))
    return "; ".join(parts)


# ---- serveConfigV2 ------------------------------------------------------------------------------------------
def model_source(source: str) -> str:
    """What Ray loads the base model from: HF ids and object-store URIs as they are, pvc:// as its mount path."""
    if source.startswith("pvc://"):
        return f"{PVC_ROOT}/{source[len('pvc://'):]}".rstrip("/")
    return source


def lora_rank(max_rank: int) -> int:
    return next(r for r in VLLM_LORA_RANKS if r >= max_rank)


def engine_kwargs(spec: LLMServiceSpec) -> dict[str, Any]:
    """vLLM engine arguments: the typed fields, extraEngineArgs over them, then the LoRA arguments."""
    engine = spec.engine
    kwargs: dict[str, Any] = {}
    if engine.max_model_len is not None:
        kwargs["max_model_len"] = engine.max_model_len
    kwargs["tensor_parallel_size"] = engine.tensor_parallel_size
    kwargs["pipeline_parallel_size"] = engine.pipeline_parallel_size
    kwargs["enable_prefix_caching"] = engine.enable_prefix_caching
    kwargs["enable_chunked_prefill"] = engine.enable_chunked_prefill
    if engine.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = engine.max_num_batched_tokens
    if engine.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    extra = engine.extra_engine_args or {}
    clashing = sorted(set(extra) & set(LORA_ENGINE_ARGS))
    if clashing:
        raise ServeConfigError(f"spec.engine.extraEngineArgs may not set {', '.join(clashing)}: the operator derives "
                               "them from spec.adapters and spec.lora (maxRank, maxAdaptersPerReplica)")
    for key in sorted(extra):
        kwargs[key] = extra[key]
    if spec.adapters:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = lora_rank(spec.lora.max_rank)
        kwargs["max_loras"] = spec.lora.max_adapters_per_replica
    return kwargs


def routing(spec: LLMServiceSpec) -> str:
    """spec.routing, or its default: prefix affinity once there can be more than one replica to choose from."""
    if spec.routing is not None:
        return spec.routing
    return "prefixAffinity" if spec.autoscaling.max_replicas > 1 else "default"


def llm_config(spec: LLMServiceSpec, plan: AdapterPlan, *, accelerator_type: str, runtime_env: Mapping[str, Any]
               ) -> dict[str, Any]:
    """One entry of build_openai_app's `llm_configs` (fields of ray.serve.llm.LLMConfig)."""
    scaling = spec.autoscaling
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": spec.model_id, "model_source": model_source(spec.model.source)},
        "accelerator_type": accelerator_type,
        "engine_kwargs": engine_kwargs(spec),
        "deployment_config": {"autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }},
    }
    if scaling.scales_to_zero:
        # Only the 1 -> 0 step waits this long; Ray Serve starts a replica at once for a request that finds none
        # (and, with every model at min_replicas 0, scales its OpenAI ingress to zero too).
        config["deployment_config"]["autoscaling_config"]["downscale_to_zero_delay_s"] = scaling.scale_to_zero_delay
    if routing(spec) == "prefixAffinity":
        config["deployment_config"]["request_router_config"] = {"request_router_class": PREFIX_AFFINITY_ROUTER}
    if plan.dynamic_lora_loading_path is not None:
        config["lora_config"] = {"dynamic_lora_loading_path": plan.dynamic_lora_loading_path,
                                 "max_num_adapters_per_replica": spec.lora.max_adapters_per_replica}
    if runtime_env:
        config["runtime_env"] = dict(runtime_env)
    return config


def serve_config(spec: LLMServiceSpec, plan: AdapterPlan, *, accelerator_type: str,
                 runtime_env: Mapping[str, Any]) -> dict[str, Any]:
    """The RayService's serveConfigV2: one OpenAI-compatible application at route "/"."""
    return {"applications": [{
        "name": SERVE_APP_NAME,
        "import_path": SERVE_IMPORT_PATH,
        "route_prefix": "/",
        "args": {"llm_configs": [llm_config(spec, plan, accelerator_type=accelerator_type,
                                            runtime_env=runtime_env)]},
    }]}


# Resources fields that do not shape an LLMService's pods: the worker count follows autoscaling, and placement
# strategy applies to training workers.
UNUSED_RESOURCES = {"workers", "placementStrategy"}


def cluster_fingerprint(spec: LLMServiceSpec) -> str:
    """Short hash of the fields that restart the vLLM engine or change the pods, so need a new Ray cluster:

    - model.source, engine (extraEngineArgs included), resources (pod size, accelerator, node pool), image,
      runtimeEnv, secrets, serviceAccountName;
    - while spec.adapters is non-empty, the engine's LoRA limits (the rendered max_lora_rank, and
      lora.maxAdaptersPerReplica as max_loras); and adapters going empty <-> non-empty (enable_lora).

    - whether autoscaling.minReplicas is 0: KubeRay 1.5 leaves a running cluster's worker-group bounds as they
      were (its cluster hash leaves them out), and the Ray autoscaler reads them there, so a service switched to
      scale to zero would keep its GPU worker, and one switched back would not keep one.

    Left out, as they only rewrite serveConfigV2 (or status) or other children: the adapters themselves, their
    FineTunes and gates, lora.dynamicLoadingPath, the rest of autoscaling, routing, modelId, expose; and
    upgradeStrategy, suspend, resources.workers.
    """
    lora = ({"maxRank": lora_rank(spec.lora.max_rank),
             "maxAdaptersPerReplica": spec.lora.max_adapters_per_replica} if spec.adapters else None)
    material = {
        "model": spec.model.wire(),
        "engine": spec.engine.wire(),
        "lora": lora,
        "resources": {k: v for k, v in spec.resources.wire().items() if k not in UNUSED_RESOURCES},
        "image": spec.image,
        "runtimeEnv": spec.runtime_env.wire() if spec.runtime_env else None,
        "secrets": spec.secrets.wire() if spec.secrets else None,
    }
    if spec.service_account_name:   # only when set, so that fingerprints from before the field stay as they were
        material["serviceAccountName"] = spec.service_account_name
    if spec.autoscaling.scales_to_zero:   # likewise
        material["scalesToZero"] = True
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
