"""BatchInference -> result channel, job ConfigMap (job.json + payload) and a RayJob running ray.data.llm."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from ..api.batchinference import BatchInferenceSpec, Engine
from ..settings import AcceleratorProfile
from .common import BuildContext, Names, Owner, config_map, payload_config_map, profile_for, result_channel
from .raycluster import pvc_claims, ray_cluster_spec, ray_job, runtime_env
from . import modelcache
from .serving import lora_rank

TAG = "bi"
# max_lora_rank for an adapter named by URI, whose rank the operator cannot read (vLLM refuses a larger adapter,
# and reserves memory for this rank): spec.engine.extraEngineArgs.max_lora_rank overrides it.
UNKNOWN_ADAPTER_MAX_RANK = 64
# vLLM sizes its scheduler by usage: its offline LLM class gets large batches, but ray.data.llm starts the engine
# without saying it is offline and so gets the engine's generic, small limits, which left the GPU idle between
# steps in the data-plane run (docs/benchmarks.md). A BatchInference is offline work: it gets the offline limits
# of vLLM's own rule (engine/arg_utils.py get_batch_defaults), by the GPU's memory and model.
LARGE_GPU_GIB = 70
OFFLINE_SCHEDULER = {"large": {"max_num_seqs": 1024, "max_num_batched_tokens": 16384},
                     "other": {"max_num_seqs": 256, "max_num_batched_tokens": 8192}}


@dataclass(frozen=True)
class ResolvedModel:
    """The model a run uses once references are resolved (a FineTune brings base model and adapter)."""

    source: str
    adapter_uri: str | None = None
    adapter_name: str | None = None
    adapter_rank: int | None = None
    """The adapter's LoRA rank when known (a FineTune's); it sizes vLLM's max_lora_rank."""

    @classmethod
    def of_finetune(cls, base_source: str, adapter_uri: str, rank: int | None) -> ResolvedModel:
        """A FineTune's base model and the adapter it produced (named after the adapter's folder)."""
        return cls(base_source, adapter_uri, adapter_uri.rstrip("/").rsplit("/", 1)[-1], rank)


def names(owner: Owner) -> Names:
    return Names.of(owner, TAG)


def offline_scheduler(profile: AcceleratorProfile, engine: Engine) -> dict[str, Any]:
    """vLLM's offline scheduler limits for this GPU (what its LLM class would pick on it)."""
    large = profile.gpu_memory_gib >= LARGE_GPU_GIB and not profile.ray_accelerator_type.upper().startswith("A100")
    limits = dict(OFFLINE_SCHEDULER["large" if large else "other"])
    if not engine.enable_chunked_prefill and engine.max_model_len:  # a whole prompt must fit one step
        limits["max_num_batched_tokens"] = max(limits["max_num_batched_tokens"], engine.max_model_len)
    return limits


def engine_kwargs(engine: Engine, model: ResolvedModel, profile: AcceleratorProfile) -> dict[str, Any]:
    """vLLM engine arguments, exactly as the engine gets them: vLLM's offline scheduler limits for the GPU, the
    spec's engine block over them (snake_case, unset ones left out), extraEngineArgs over that, then the LoRA
    arguments an adapter needs (one adapter per run; its own rank, rounded up to one vLLM accepts)."""
    kwargs: dict[str, Any] = {
        "max_model_len": engine.max_model_len,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "enable_chunked_prefill": engine.enable_chunked_prefill,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
    }
    kwargs = {**offline_scheduler(profile, engine), **{k: v for k, v in kwargs.items() if v is not None}}
    kwargs.update(engine.extra_engine_args or {})
    if model.adapter_uri:
        kwargs["enable_lora"] = True
        rank = lora_rank(model.adapter_rank) if model.adapter_rank else UNKNOWN_ADAPTER_MAX_RANK
        kwargs.setdefault("max_lora_rank", rank)
        kwargs["max_loras"] = 1
    return kwargs


def resolved_from_spec(spec: BatchInferenceSpec) -> ResolvedModel | None:
    """The model when the spec names it directly (None: it comes from a FineTune)."""
    if spec.model.source is None:
        return None
    adapter = spec.model.adapter
    return ResolvedModel(spec.model.source, adapter.uri if adapter else None,
                         adapter.uri.rstrip("/").rsplit("/", 1)[-1] if adapter else None)


def job_json(owner: Owner, spec: BatchInferenceSpec, model: ResolvedModel,
             profile: AcceleratorProfile) -> dict[str, Any]:
    wire = spec.wire()
    adapter = {"name": model.adapter_name, "uri": model.adapter_uri} if model.adapter_uri else None
    return {
        "kind": owner.kind, "name": owner.name, "namespace": owner.namespace,
        "model": {"source": model.source, "adapter": adapter},
        "input": wire["input"],
        "prompt": {"systemPrompt": spec.prompt.system_prompt, "systemField": spec.prompt.system_field,
                   "userField": spec.prompt.user_field},
        "sampling": wire["sampling"],
        "engineKwargs": engine_kwargs(spec.engine, model, profile),
        "acceleratorType": profile.ray_accelerator_type,
        "concurrency": spec.concurrency,
        "batchSize": spec.batch_size,
        "output": wire["output"],
        "evaluation": wire.get("evaluation"),
    }


def cached_model(owner: Owner, spec: BatchInferenceSpec, model: ResolvedModel) -> modelcache.CachedModel | None:
    return modelcache.cached_model(owner, TAG, model.source, None, spec.model.cache)


def image(spec: BatchInferenceSpec, ctx: BuildContext) -> str:
    return spec.image or ctx.settings.inference_image


def build(owner: Owner, spec: BatchInferenceSpec, ctx: BuildContext, model: ResolvedModel) -> list[dict[str, Any]]:
    """Every child of a BatchInference (the engine decides the order they are applied in). With a model cache,
    these are the children once the model is cached: the workers load it from the claim."""
    n = names(owner)
    cached = cached_model(owner, spec, model)
    model = replace(model, source=modelcache.cached_source(cached, model.source))
    profile = profile_for(spec.resources, ctx.settings)
    files = {"job.json": json.dumps(job_json(owner, spec, model, profile), indent=2,
                                    sort_keys=True)}
    claims = pvc_claims(model.source, model.adapter_uri, spec.input.uri, spec.output.uri)
    cluster = ray_cluster_spec(owner, n, spec, spec.resources, image(spec, ctx), ctx, claims,
                               model_source=model.source, read_only_claims=modelcache.read_only(cached))
    entrypoint = "python -m payloads.batch_inference --config /etc/llmops/job/job.json"
    return [
        *result_channel(owner, n, ctx.settings, spec),
        payload_config_map(owner.namespace, ctx.payloads, ctx.settings),
        config_map(owner, n, ctx.settings, files),
        ray_job(owner, n, spec, cluster, entrypoint,
                runtime_env(spec, setup_timeout_s=ctx.settings.runtime_env_setup_timeout_seconds), ctx.settings),
    ]
