"""FineTune -> result channel, job ConfigMap (LLaMA-Factory config + payload) and a RayJob."""

from __future__ import annotations

import json
from typing import Any

from .. import yamlio
from ..api.finetune import FineTuneSpec
from . import llamafactory, modelcache
from .common import BuildContext, Names, Owner, config_map, payload_config_map, profile_for, result_channel
from .raycluster import pvc_claims, ray_cluster_spec, ray_job, runtime_env
from .recipe import training_recipe
from .sizing import model_params_b

TAG = "ft"
# Node-local scratch (an emptyDir on every Ray pod) where the driver stages datasets for the workers.
STAGING_DIR = "/mnt/llmops/scratch"


def names(owner: Owner) -> Names:
    return Names.of(owner, TAG)


def recipe_for(spec: FineTuneSpec, ctx: BuildContext) -> dict[str, Any]:
    t = spec.training
    # The stock image has no flash-attn: SDPA. Asking for a shared prefix asks for its mask too.
    flash = ctx.settings.finetune_flash_attention and not t.shared_prefix
    attention = t.attention or (None if flash else "sdpa")
    overrides = {"packing": t.packing, "perDeviceBatchSize": t.per_device_batch_size,
                 "gradientAccumulationSteps": t.gradient_accumulation_steps,
                 "gradientCheckpointing": t.gradient_checkpointing, "attention": attention,
                 "sharedPrefix": t.shared_prefix, "compile": t.compile}
    return training_recipe(gpu_memory_gib=profile_for(spec.resources, ctx.settings).gpu_memory_gib,
                           base_model_params_b=model_params_b(spec.base_model.source),
                           cutoff_len=spec.dataset.cutoff_len, lora_rank=spec.method.rank,
                           overrides={k: v for k, v in overrides.items() if v is not None})


def job_description(owner: Owner, spec: FineTuneSpec) -> dict[str, Any]:
    """``job.json``: what the driver needs beside the training config."""
    return {"kind": owner.kind, "name": owner.name, "namespace": owner.namespace, "uid": owner.uid,
            **{k: v for k, v in spec.wire().items() if k in ("baseModel", "method", "dataset", "output")},
            "resume": spec.training.resume}


def job_files(owner: Owner, spec: FineTuneSpec, ctx: BuildContext) -> dict[str, str]:
    profile = profile_for(spec.resources, ctx.settings)
    config = llamafactory.train_config(spec, name=owner.name, recipe=recipe_for(spec, ctx),
                                       accelerator_type=profile.ray_accelerator_type, staging_dir=STAGING_DIR)
    return {
        "job.json": json.dumps(job_description(owner, spec), indent=2, sort_keys=True),
        "train.yaml": yamlio.dump(config),
        "dataset_info.json": json.dumps(llamafactory.dataset_info(spec, STAGING_DIR), indent=2, sort_keys=True),
    }


def cached_model(owner: Owner, spec: FineTuneSpec) -> modelcache.CachedModel | None:
    base = spec.base_model
    return modelcache.cached_model(owner, TAG, base.source, base.revision, base.cache)


def image(spec: FineTuneSpec, ctx: BuildContext) -> str:
    return spec.image or ctx.settings.finetune_image


def build(owner: Owner, spec: FineTuneSpec, ctx: BuildContext) -> list[dict[str, Any]]:
    """Every child of a FineTune (the engine decides the order they are applied in). With a model cache, these
    are the children once the model is cached: the workers load it from the claim."""
    n = names(owner)
    cached = cached_model(owner, spec)
    if cached is not None:   # the revision was the download's to fetch; the claim holds only that one
        spec = spec.model_copy(update={"base_model": spec.base_model.model_copy(
            update={"source": cached.uri, "revision": None})})
    files = job_files(owner, spec, ctx)
    claims = pvc_claims(spec.base_model.source, spec.dataset.train.uri,
                        spec.dataset.validation.uri if spec.dataset.validation else None, spec.output.uri)
    cluster = ray_cluster_spec(owner, n, spec, spec.resources, image(spec, ctx), ctx, claims,
                               model_source=spec.base_model.source, scratch=STAGING_DIR,
                               read_only_claims=modelcache.read_only(cached))
    runtime = runtime_env(spec, ctx.settings.finetune_pip,
                          setup_timeout_s=ctx.settings.runtime_env_setup_timeout_seconds)
    runtime.setdefault("env_vars", {})["USE_RAY"] = "1"
    entrypoint = "python -m payloads.finetune --config /etc/llmops/job/job.json"
    return [
        *result_channel(owner, n, ctx.settings, spec),
        payload_config_map(owner.namespace, ctx.payloads, ctx.settings),
        config_map(owner, n, ctx.settings, files),
        ray_job(owner, n, spec, cluster, entrypoint, runtime, ctx.settings),
    ]


def build_manifest(body: dict[str, Any], ctx: BuildContext) -> list[dict[str, Any]]:
    """`build` for callers holding a manifest (benches, tests): its spec validated first."""
    return build(Owner.of(body), FineTuneSpec.model_validate(body["spec"]), ctx)
