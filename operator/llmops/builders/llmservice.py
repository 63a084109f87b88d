"""LLMService -> a RayService running ray.serve.llm's OpenAI app on an autoscaling GPU worker group."""

from __future__ import annotations

import math
from typing import Any

from .. import yamlio
from ..api.llmservice import LLMServiceSpec
from ..settings import Settings
from . import exposure, modelcache
from .common import BuildContext, Names, Owner, owned, profile_for
from .raycluster import pvc_claims, ray_cluster_spec, runtime_env
from .serving import AdapterPlan, cluster_fingerprint, serve_config

TAG = "llm"
SERVE_PORT = 8000
FINGERPRINT_ANNOTATION = "llmops.dev/cluster-fingerprint"


def names(owner: Owner) -> Names:
    return Names.of(owner, TAG)


def endpoint(owner: Owner, settings: Settings) -> str:
    """In-cluster OpenAI base URL: KubeRay's serve Service for the RayService."""
    service = exposure.serve_service(names(owner).ray)
    return f"http://{service}.{owner.namespace}.svc.{settings.cluster_domain}:{SERVE_PORT}/v1"


def workers_per_replica(spec: LLMServiceSpec) -> int:
    gpus = spec.engine.tensor_parallel_size * spec.engine.pipeline_parallel_size
    return max(1, math.ceil(gpus / spec.resources.gpus_per_worker))


def cached_model(owner: Owner, spec: LLMServiceSpec) -> modelcache.CachedModel | None:
    return modelcache.cached_model(owner, TAG, spec.model.source, None, spec.model.cache)


def image(spec: LLMServiceSpec, ctx: BuildContext) -> str:
    return spec.image or ctx.settings.inference_image


def build(owner: Owner, spec: LLMServiceSpec, ctx: BuildContext, plan: AdapterPlan, expose: bool = True
          ) -> list[dict[str, Any]]:
    """The RayService (Serve needs no result channel) and, with spec.expose and `expose`, the HTTPRoute to it and
    its API-key policy (`expose` is False while the APIs they need are missing). With a model cache, these are
    the children once the model is cached: the replicas load it from the claim."""
    n = names(owner)
    cached = cached_model(owner, spec)
    if cached is not None:
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"source": cached.uri})})
    profile = profile_for(spec.resources, ctx.settings)
    fingerprint = cluster_fingerprint(spec)
    per_replica = workers_per_replica(spec)
    max_workers = spec.autoscaling.max_replicas * per_replica
    resources = spec.resources.model_copy(update={"workers": spec.autoscaling.min_replicas * per_replica})
    cluster = ray_cluster_spec(owner, n, spec, resources, image(spec, ctx), ctx, pvc_claims(spec.model.source),
                               model_source=spec.model.source, autoscale_to=max_workers,
                               read_only_claims=modelcache.read_only(cached), writes_claims=False)
    # No job files or payloads for serving: drop the ConfigMap volumes the job kinds mount.
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        pod["volumes"] = [v for v in pod["volumes"] if not v["name"].startswith("llmops-")]
        for c in pod["containers"]:
            c["volumeMounts"] = [m for m in c["volumeMounts"] if not m["name"].startswith("llmops-")]
            c["env"] = [e for e in c["env"] if e["name"] not in ("PYTHONPATH", "LLMOPS_RESULT_CONFIGMAP")]
        if spec.service_account_name is None:   # Serve reports nothing: no account of ours is needed
            pod.pop("serviceAccountName", None)
        if not pod["volumes"]:
            del pod["volumes"]
            for c in pod["containers"]:
                del c["volumeMounts"]
        # KubeRay starts a new cluster (upgradeStrategy) when rayClusterConfig changes: carrying the fingerprint of
        # model, engine and resources here makes those changes roll out that way, while adapter changes (only in
        # serveConfigV2) apply in place.
        group["template"]["metadata"].setdefault("annotations", {})[FINGERPRINT_ANNOTATION] = fingerprint
    serve = serve_config(spec, plan, accelerator_type=profile.ray_accelerator_type, runtime_env=runtime_env(spec))
    service = {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": n.ray},
        "spec": {
            "upgradeStrategy": {"type": spec.upgrade_strategy},
            "serveConfigV2": yamlio.dump(serve),
            "rayClusterConfig": cluster,
        },
    }
    route = exposure.build(owner, n.ray, n.ray, SERVE_PORT, spec.expose, ctx.settings) if expose else []
    return [*route, owned(service, owner, ctx.settings)]
