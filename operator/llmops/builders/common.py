"""Pieces every kind's children share: names, labels, ownership, the result channel, the Ray cluster spec.

All functions are pure: (custom resource, settings, inputs) -> plain dicts.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from importlib import resources
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..api.common import JobControls, Resources, WorkloadControls
from ..settings import AcceleratorProfile, Settings
from .sizing import ephemeral_storage, shm_volume

JOB_MOUNT = "/etc/llmops/job"
PAYLOAD_ROOT = "/opt/llmops"
PVC_ROOT = "/mnt/llmops/pvc"
RAY_NAME_MAX = 40  # KubeRay derives longer names (cluster, head service) from the RayJob/RayService name
# Labels on every child. Fixed, not a setting: the operator's watches and indexes select by them (handlers/main.py).
LABEL_PREFIX = "llmops.dev"
ROLE_LABEL = f"{LABEL_PREFIX}/role"            # RESULT_ROLE, "config", PAYLOADS_ROLE
RESULT_ROLE = "result"       # the ConfigMap a job's payload reports into
CACHE_ROLE = "cache-report"  # the ConfigMap a model download reports into
DOWNLOAD_ROLE = "model-download"   # the pod of a model download Job (not a Ray pod)
PAYLOADS_ROLE = "payloads"   # the namespace's shared ConfigMap of payload sources
OWNER_KIND_LABEL = f"{LABEL_PREFIX}/owner-kind"
OWNER_UID_LABEL = f"{LABEL_PREFIX}/owner-uid"
MANAGED_BY = {"app.kubernetes.io/managed-by": "llmops"}   # on every child; the watches select by it
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"   # a RayJob's Kueue LocalQueue: Kueue manages the jobs that carry it
WORKLOAD_API = "kueue.x-k8s.io/v1beta2"      # Kueue's Workload: one per queued job, it holds why the job waits
WORKLOAD_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"   # on a Workload: the uid of the job it was made for


@dataclass(frozen=True)
class Owner:
    """The custom resource a set of children belongs to."""

    api_version: str
    kind: str
    name: str
    namespace: str
    uid: str
    generation: int = 1

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(body["apiVersion"], body["kind"], meta["name"], meta["namespace"], meta.get("uid", ""),
                   meta.get("generation", 1))


@dataclass(frozen=True)
class BuildContext:
    """Everything a builder may read besides the resource itself."""

    settings: Settings
    payloads: Mapping[str, str] = field(default_factory=dict)
    """Payload module file name -> source, shipped to the Ray pods."""


def short_hash(data: Any, length: int = 10) -> str:
    text = data if isinstance(data, str) else json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def child_name(owner: Owner, suffix: str, limit: int = 63) -> str:
    """`<owner>-<suffix>`, shortened with a hash when too long, stable for the same owner."""
    name = f"{owner.name}-{suffix}"
    return name if len(name) <= limit else _hashed_name(owner.name, owner.name, suffix, limit)


def _hashed_name(stem: str, identity: str, suffix: str, limit: int) -> str:
    """`<stem, cut to fit>-<hash of identity>-<suffix>`: within `limit`, and distinct for distinct identities."""
    keep = limit - len(suffix) - 8
    return f"{stem[:keep].rstrip('-')}-{short_hash(identity, 6)}-{suffix}"


DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def ray_name(owner: Owner, tag: str) -> str:
    """The RayJob / RayService name. KubeRay refuses any but a DNS-1035 label (lowercase letters, digits and '-',
    a letter first), while our resources may be named like any object (`viggo.v2`, `0`): such a name is spelled
    with '-' for the rest, an `r-` in front of a digit, and a hash of the real name so that `a.b` and `a-b` differ."""
    name = child_name(owner, tag, RAY_NAME_MAX)
    if DNS1035_LABEL.fullmatch(name):
        return name
    stem = re.sub(r"[^a-z0-9-]+", "-", owner.name).strip("-")
    stem = f"r-{stem}" if not stem[:1].isalpha() else stem
    return _hashed_name(stem, owner.name, tag, RAY_NAME_MAX)


@dataclass(frozen=True)
class Names:
    ray: str          # RayJob / RayService
    config: str       # ConfigMap with the job files and the payload sources
    result: str       # ConfigMap the payload reports into
    account: str      # ServiceAccount, Role and RoleBinding of the Ray pods

    @classmethod
    def of(cls, owner: Owner, tag: str) -> Names:
        return cls(ray=ray_name(owner, tag), config=child_name(owner, f"{tag}-config"),
                   result=child_name(owner, f"{tag}-result"), account=child_name(owner, f"{tag}-ray"))


def labels(owner: Owner) -> dict[str, str]:
    return {**MANAGED_BY, OWNER_KIND_LABEL: owner.kind, OWNER_UID_LABEL: owner.uid}


def owned(obj: dict[str, Any], owner: Owner, settings: Settings, extra_labels: Mapping[str, str] | None = None
          ) -> dict[str, Any]:
    """Namespace, labels and a controller owner reference (so the garbage collector cleans up)."""
    meta = obj.setdefault("metadata", {})
    meta["namespace"] = owner.namespace
    meta["labels"] = {**labels(owner), **(extra_labels or {}), **meta.get("labels", {})}
    meta["ownerReferences"] = [{"apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                                "uid": owner.uid, "controller": True, "blockOwnerDeletion": True}]
    return obj


# ---- the result channel -----------------------------------------------------------------------------------
def ray_account(names: Names, spec: WorkloadControls) -> str:
    """The ServiceAccount the Ray pods run as: the spec's own, else the one the operator creates."""
    return spec.service_account_name or names.account


def result_channel(owner: Owner, names: Names, settings: Settings, spec: WorkloadControls,
                   role: str = RESULT_ROLE) -> list[dict[str, Any]]:
    """Result ConfigMap and a Role that may get/patch only that ConfigMap, bound to the pods' ServiceAccount:
    one the operator creates, or the spec's own (which gains nothing else)."""
    account = ray_account(names, spec)
    created = []
    if spec.service_account_name is None:
        meta: dict[str, Any] = {"name": names.account}
        if settings.ray_service_account_annotations:
            meta["annotations"] = dict(settings.ray_service_account_annotations)
        created.append(owned({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
                              "automountServiceAccountToken": True}, owner, settings))
    return [
        owned({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": names.result}, "data": {}},
              owner, settings, {ROLE_LABEL: role}),
        *created,
        owned({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": names.account},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [names.result],
                          "verbs": ["get", "patch"]}]}, owner, settings),
        owned({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": names.account},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.account},
               "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": owner.namespace}]},
              owner, settings),
    ]


def config_map(owner: Owner, names: Names, settings: Settings, files: Mapping[str, str]) -> dict[str, Any]:
    return owned({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": names.config}, "data": dict(files)},
                 owner, settings, {ROLE_LABEL: "config"})


# ---- the payload sources, shared ----------------------------------------------------------------------------


def payloads_name(payloads: Mapping[str, str]) -> str:
    """Named by content: an operator upgrade that changes a payload makes a new one, and running jobs keep theirs."""
    return _payloads_name(tuple(sorted(payloads.items())))


@functools.lru_cache(maxsize=8)
def _payloads_name(items: tuple[tuple[str, str], ...]) -> str:
    return f"llmops-payloads-{short_hash(dict(items))}"   # the data exactly as written (keys are file names)


def load_payloads() -> dict[str, str]:
    """The payload modules shipped to Ray pods, read from the installed `payloads` package."""
    package = resources.files("payloads")
    return {f.name: f.read_text() for f in sorted(package.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".py")}


def payload_config_map(namespace: str, payloads: Mapping[str, str], settings: Settings) -> dict[str, Any]:
    """Every payload module in one immutable ConfigMap per namespace, shared by all jobs there (each job used to
    carry its own ~80 KB copy). It has no owner: it is written once and stays until the namespace goes."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
            "metadata": {"name": payloads_name(payloads), "namespace": namespace,
                         "labels": {**MANAGED_BY, ROLE_LABEL: PAYLOADS_ROLE}},
            "data": dict(sorted(payloads.items()))}   # keyed by file name: mounted whole as the package


def is_shared(child: Mapping[str, Any]) -> bool:
    return (child["metadata"].get("labels") or {}).get(ROLE_LABEL) == PAYLOADS_ROLE


# ---- pods ---------------------------------------------------------------------------------------------------
def pvc_claims(*uris: str | None) -> list[str]:
    """Claims named by pvc://<claim>/<path> URIs, in first-seen order."""
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri[len("pvc://"):].split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def volumes(names: Names, payload_config: str, claims: list[str], scratch: str | None = None,
            read_only: frozenset[str] = frozenset()) -> tuple[list[dict], list[dict]]:
    """The job's files and the payload package, each ConfigMap mounted whole (listing its keys would make the Ray
    object larger, and every write of it dearer to the API server); claims in `read_only` (a model cache) are
    mounted read-only."""
    vols = [
        {"name": "llmops-job", "configMap": {"name": names.config}},
        {"name": "llmops-payloads", "configMap": {"name": payload_config}},
    ]
    mounts = [{"name": "llmops-job", "mountPath": JOB_MOUNT, "readOnly": True},
              {"name": "llmops-payloads", "mountPath": f"{PAYLOAD_ROOT}/payloads", "readOnly": True}]
    for i, claim in enumerate(claims):
        if claim in read_only:
            vols.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
            mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
            continue
        vols.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}"})
    if scratch:
        vols.append({"name": "llmops-scratch", "emptyDir": {}})
        mounts.append({"name": "llmops-scratch", "mountPath": scratch})
    return vols, mounts


def pod_env(names: Names, spec: WorkloadControls) -> tuple[list[dict], list[dict]]:
    """Environment of every Ray container: where to report, credentials as Secret references only."""
    env = [
        {"name": "PYTHONPATH", "value": PAYLOAD_ROOT},
        {"name": "LLMOPS_RESULT_CONFIGMAP", "value": names.result},
        {"name": "LLMOPS_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    env_from: list[dict] = []
    secrets = spec.secrets
    if secrets and secrets.hugging_face_token:
        ref = secrets.hugging_face_token
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if secrets and secrets.storage:
        env_from.append({"secretRef": {"name": secrets.storage.name}})
    return env, env_from


def profile_for(resources: Resources, settings: Settings) -> AcceleratorProfile:
    profiles = settings.profiles()
    profile = profiles.get(resources.accelerator)
    if profile is None:
        known = ", ".join(sorted(profiles))
        raise UnknownAccelerator(f"spec.resources.accelerator {resources.accelerator!r} is not a profile of this "
                                 f"operator (cloud {settings.cloud}); use one of {known} or add it to the operator "
                                 "settings (accelerators)")
    return profile


class UnknownAccelerator(ValueError):
    pass


def accelerator_resources(profile: AcceleratorProfile) -> dict[str, int]:
    """The custom resource Ray gives a node with this GPU (`accelerator_type:L4`), which every vLLM replica and
    training worker asks for. Ray detects it on a running node, but the autoscaler only knows what a worker group
    declares: without this, a group with no pod yet offers nothing a replica asks for and never scales up."""
    return {f"accelerator_type:{profile.ray_accelerator_type}": 1}


def ray_start_resources(resources: Mapping[str, int]) -> str:
    """rayStartParams `resources`: KubeRay pastes the value into the `ray start` shell line, and Ray's KubeRay
    autoscaler reads it back by dropping the outer quotes and every backslash, so the JSON is quoted once more."""
    text = json.dumps(dict(resources), sort_keys=True)
    return '"' + text.replace('"', '\\"') + '"'


def container(name: str, image: str, env: list, env_from: list, mounts: list, requests: dict, limits: dict
              ) -> dict[str, Any]:
    # A container that dies leaves its log tail as its termination message, where the status can read why (a CUDA
    # driver too old for the image shows up there).
    c: dict[str, Any] = {"name": name, "image": image, "env": env, "terminationMessagePolicy": "FallbackToLogsOnError"}
    if env_from:
        c["envFrom"] = env_from
    c["volumeMounts"] = mounts
    c["resources"] = {"requests": requests, "limits": limits}
    return c


def ray_cluster_spec(owner: Owner, names: Names, spec: WorkloadControls, resources: Resources, image: str,
                     ctx: BuildContext, claims: list[str], *, model_source: str,
                     autoscale_to: int | None = None, scratch: str | None = None,
                     read_only_claims: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A CPU head (no GPU work there) and one GPU worker group on the accelerator's node pool."""
    settings = ctx.settings
    profile = profile_for(resources, settings)
    env, env_from = pod_env(names, spec)
    vols, mounts = volumes(names, payloads_name(ctx.payloads), claims, scratch, read_only_claims)
    pod_labels = labels(owner)
    head = settings.head
    head_shm, shm_mount = shm_volume(head.memory)
    head_pod: dict[str, Any] = {
        "serviceAccountName": ray_account(names, spec),
        "containers": [container("ray-head", image, env, env_from, [*mounts, shm_mount],
                                 {"cpu": head.cpu, "memory": head.memory},
                                 {"cpu": head.cpu, "memory": head.memory})],
        "volumes": [*vols, head_shm],
    }
    if head.node_selector:
        head_pod["nodeSelector"] = dict(head.node_selector)
    if head.tolerations:
        head_pod["tolerations"] = list(head.tolerations)
    gpus = str(resources.gpus_per_worker)
    worker_resources = {"cpu": str(resources.cpus_per_worker), "memory": resources.memory_per_worker,
                        profile.gpu_resource: gpus}
    worker_shm, _ = shm_volume(resources.memory_per_worker)
    worker_pod: dict[str, Any] = {
        "serviceAccountName": ray_account(names, spec),
        "containers": [container("ray-worker", image, env, env_from, [*mounts, shm_mount],
                                 {**worker_resources, "ephemeral-storage": ephemeral_storage(model_source)},
                                 dict(worker_resources))],
        "volumes": [*vols, worker_shm],
        "nodeSelector": {**profile.node_selector, **(resources.node_selector or {})},
        "tolerations": [*profile.tolerations, *(t.wire() for t in resources.tolerations or [])],
    }
    replicas = resources.workers
    worker_group: dict[str, Any] = {
        "groupName": "gpu",
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas if autoscale_to is None else max(replicas, autoscale_to),
        "rayStartParams": {"resources": ray_start_resources(accelerator_resources(profile))},
        "template": {"metadata": {"labels": dict(pod_labels)}, "spec": worker_pod},
    }
    cluster: dict[str, Any] = {
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": {"metadata": {"labels": dict(pod_labels)}, "spec": head_pod},
        },
        "workerGroupSpecs": [worker_group],
    }
    if autoscale_to is not None:
        cluster["enableInTreeAutoscaling"] = True
    return cluster


def runtime_env(spec: WorkloadControls, extra_pip: list[str] | None = None, *, setup_timeout_s: int | None = None
                ) -> dict[str, Any]:
    """Ray's runtime environment. With pip packages, Ray installs them on every node before the job starts, and
    gives up after `setup_timeout_s` (Ray's own default, 600 s, is short for a large install on a cold node)."""
    env: dict[str, Any] = {}
    pip = [*(extra_pip or []), *((spec.runtime_env.pip if spec.runtime_env else None) or [])]
    if pip:
        env["pip"] = pip
        if setup_timeout_s is not None:
            env["config"] = {"setup_timeout_seconds": setup_timeout_s}
    if spec.runtime_env and spec.runtime_env.env_vars:
        env["env_vars"] = dict(spec.runtime_env.env_vars)
    return env


def ray_job(owner: Owner, names: Names, spec: JobControls, cluster: dict[str, Any], entrypoint: str,
            runtime: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from .. import yamlio
    job_spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "shutdownAfterJobFinishes": True,
        "backoffLimit": spec.backoff_limit,
        "suspend": spec.suspend,
        "submissionMode": "K8sJobMode",
    }
    if spec.queue_name is not None:
        # spec.suspend belongs to Kueue: it suspends the job until admitted and unsuspends it with an update,
        # which takes the field's ownership from every other manager. Applied with force, the field would suspend
        # an admitted job again; applied once and then dropped, server-side apply would remove it (a field only
        # the applier owned goes when its applied configuration drops it) and start a job Kueue holds back.
        # Never applied, it is never ours, and what Kueue wrote stands.
        del job_spec["suspend"]
    if runtime:
        job_spec["runtimeEnvYAML"] = yamlio.dump(runtime)
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.priority_class_name:
        cluster = with_priority_class(cluster, spec.priority_class_name)
    job_spec["rayClusterSpec"] = cluster
    queue = {QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    return owned({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": names.ray}, "spec": job_spec},
                 owner, settings, queue)


def with_priority_class(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    """Every Ray pod at this PriorityClass; Kueue takes a queued job's priority from the head's (its first pod
    set) when no WorkloadPriorityClass label names one."""
    cluster = copy.deepcopy(cluster)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        group["template"]["spec"]["priorityClassName"] = name
    return cluster
