"""A model cache: a PersistentVolumeClaim, the Job that downloads the model into it, and its report channel.

The Ray pods then mount the claim read-only and load the model from it as from any pvc:// source, so the builders
of the three kinds only swap the model's source for the cache's pvc:// URI (`cached_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api.common import ModelCache, WorkloadControls
from .common import (
    CACHE_ROLE,
    DOWNLOAD_ROLE,
    PAYLOAD_ROOT,
    ROLE_LABEL,
    PVC_ROOT,
    BuildContext,
    Names,
    Owner,
    child_name,
    labels,
    owned,
    payload_config_map,
    payloads_name,
    ray_account,
    result_channel,
)
from .raycluster import container, pod_env, secured

# The download pod streams files to disk: little CPU and memory, whatever the model's size.
DOWNLOAD_REQUESTS = {"cpu": "1", "memory": "2Gi"}
DOWNLOAD_LIMITS = {"memory": "4Gi"}
ACCESS_MODES = {"ReadWriteMany": ["ReadWriteMany"],
                # The download pod writes the disk once on one node; every reader then attaches it read-only.
                "ReadOnlyMany": ["ReadWriteOnce", "ReadOnlyMany"]}


@dataclass(frozen=True)
class CachedModel:
    """What to download, and from where the Ray pods then load it."""

    name: str            # the claim, the Job, its report ConfigMap and its ServiceAccount all share it
    source: str          # the model as the spec names it (Hugging Face id, s3://, gs://)
    revision: str | None
    cache: ModelCache

    @property
    def uri(self) -> str:
        """pvc://<claim>/<the source's last segment>: named like the model, so sizing by name still works."""
        return f"pvc://{self.name}/{self.source.rstrip('/').rsplit('/', 1)[-1]}"


def cached_model(owner: Owner, tag: str, source: str, revision: str | None, cache: ModelCache | None
                 ) -> CachedModel | None:
    """The cache of this owner's model, or None when there is none (no cache set, or a pvc:// model: read in
    place)."""
    if cache is None or source.startswith("pvc://"):
        return None
    return CachedModel(child_name(owner, f"{tag}-cache"), source, revision, cache)


def cached_source(model: CachedModel | None, source: str) -> str:
    return model.uri if model is not None else source


def read_only(model: CachedModel | None) -> frozenset[str]:
    return frozenset({model.name}) if model is not None else frozenset()


def claim(owner: Owner, model: CachedModel, ctx: BuildContext) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": list(ACCESS_MODES[model.cache.access_mode]),
                            "resources": {"requests": {"storage": model.cache.size}}}
    if model.cache.storage_class_name:
        spec["storageClassName"] = model.cache.storage_class_name
    return owned({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": model.name},
                  "spec": spec}, owner, ctx.settings)


def command(model: CachedModel) -> list[str]:
    args = ["python", "-m", "payloads.model_download", "--source", model.source, "--dest", model.uri]
    if model.revision:
        args += ["--revision", model.revision]
    return args


def download_job(owner: Owner, model: CachedModel, spec: WorkloadControls, image: str, ctx: BuildContext
                 ) -> dict[str, Any]:
    """One pod, no retry: the payload retries what is transient itself and reports what is not."""
    names = _names(model)
    env, env_from = pod_env(names, spec)
    mounts = [{"name": "llmops-payloads", "mountPath": f"{PAYLOAD_ROOT}/payloads", "readOnly": True},
              {"name": "model-cache", "mountPath": f"{PVC_ROOT}/{model.name}"}]
    vols = [{"name": "llmops-payloads", "configMap": {"name": payloads_name(ctx.payloads)}},
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": model.name}}]
    pod = container("download", image, env, env_from, mounts, dict(DOWNLOAD_REQUESTS), dict(DOWNLOAD_LIMITS))
    pod["command"] = command(model)
    return owned({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": model.name},
                  "spec": {"backoffLimit": 0,
                           # labelled like the Ray pods, so the status can say why the pod does not run
                           "template": {"metadata": {"labels": {**labels(owner), ROLE_LABEL: DOWNLOAD_ROLE}},
                                        "spec": secured({"restartPolicy": "Never",
                                                         "serviceAccountName": ray_account(names, spec),
                                                         "containers": [pod], "volumes": vols},
                                                        ctx.settings, writes_claims=True)}}},
                 owner, ctx.settings)


def _names(model: CachedModel) -> Names:
    return Names(ray=model.name, config=model.name, result=model.name, account=model.name)


def build(owner: Owner, model: CachedModel, spec: WorkloadControls, image: str, ctx: BuildContext
          ) -> list[dict[str, Any]]:
    """The claim, the report channel (ConfigMap, Role, RoleBinding; a ServiceAccount unless the spec names one)
    and the download Job, last: the engine applies the last child after the others."""
    return [
        claim(owner, model, ctx),
        payload_config_map(owner.namespace, ctx.payloads, ctx.settings),
        *result_channel(owner, _names(model), ctx.settings, spec, role=CACHE_ROLE),
        download_job(owner, model, spec, image, ctx),
    ]
