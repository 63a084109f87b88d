"""The Ray object's pods: volumes, environment, the CPU head and the GPU worker group, the RayJob around them.

All functions are pure: (custom resource, settings, inputs) -> plain dicts.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping

from ..api.common import JobControls, Resources, WorkloadControls
from ..settings import AcceleratorProfile, Settings
from .common import (JOB_MOUNT, PAYLOAD_ROOT, PVC_ROOT, QUEUE_LABEL, BuildContext, Names, Owner, labels, owned,
                     payloads_name, profile_for, ray_account)
from .sizing import ephemeral_storage, shm_volume


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


# What the `restricted` Pod Security Standard asks of each container; the pod's part is in pod_security.
RESTRICTED_CONTAINER: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# KubeRay's default submitter pod's resources (its GetDefaultSubmitterContainer), kept when we template it.
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


def restricted(settings: Settings) -> bool:
    return settings.ray_pod_security == "restricted"


def pod_security(settings: Settings, writes_claims: bool) -> dict[str, Any]:
    """A pod's securityContext: non-root under the runtime's seccomp profile where the settings ask for the
    restricted standard; the claims' group (settings.ray_fs_group) where the pod writes a claim."""
    context: dict[str, Any] = {}
    if restricted(settings):
        context.update(runAsNonRoot=True, seccompProfile={"type": "RuntimeDefault"})
    if writes_claims and settings.ray_fs_group is not None:
        context.update(fsGroup=settings.ray_fs_group, fsGroupChangePolicy="OnRootMismatch")
    return context


def secured(pod: dict[str, Any], settings: Settings, writes_claims: bool) -> dict[str, Any]:
    """`pod` (a pod spec) with the securityContexts the settings ask for; by default only a written claim's group."""
    if context := pod_security(settings, writes_claims):
        pod["securityContext"] = context
    if restricted(settings):
        for c in pod["containers"]:
            c["securityContext"] = copy.deepcopy(RESTRICTED_CONTAINER)
    return pod


def ray_cluster_spec(owner: Owner, names: Names, spec: WorkloadControls, resources: Resources, image: str,
                     ctx: BuildContext, claims: list[str], *, model_source: str,
                     autoscale_to: int | None = None, scratch: str | None = None,
                     read_only_claims: frozenset[str] = frozenset(), writes_claims: bool = True) -> dict[str, Any]:
    """A CPU head (no GPU work there) and one GPU worker group on the accelerator's node pool. `writes_claims`:
    the pods may write the claims they mount read-write (a job's output); serving only reads them."""
    settings = ctx.settings
    writes = writes_claims and any(claim not in read_only_claims for claim in claims)
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
    secured(head_pod, settings, writes)
    secured(worker_pod, settings, writes)
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
        if restricted(settings):   # KubeRay adds the autoscaler container to the head pod
            cluster["autoscalerOptions"] = {"securityContext": copy.deepcopy(RESTRICTED_CONTAINER)}
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
    if restricted(settings):
        job_spec["submitterPodTemplate"] = submitter_template(cluster, settings)
    job_spec["rayClusterSpec"] = cluster
    queue = {QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    return owned({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": names.ray}, "spec": job_spec},
                 owner, settings, queue)


def submitter_template(cluster: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """KubeRay's default submitter pod (the head's image, KubeRay's resources; KubeRay adds the command) under the
    restricted standard: KubeRay's own sets no securityContext, and a restricted namespace refuses it."""
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    submitter = {"name": "ray-job-submitter", "image": head["image"], "resources": copy.deepcopy(SUBMITTER_RESOURCES)}
    return {"spec": secured({"restartPolicy": "Never", "containers": [submitter]}, settings, writes_claims=False)}


def with_priority_class(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    """Every Ray pod at this PriorityClass; Kueue takes a queued job's priority from the head's (its first pod
    set) when no WorkloadPriorityClass label names one."""
    cluster = copy.deepcopy(cluster)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        group["template"]["spec"]["priorityClassName"] = name
    return cluster
