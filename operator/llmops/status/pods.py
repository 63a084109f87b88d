"""What the pods of a Ray object say: unschedulable, image pulls, an old GPU driver, a node gone (preemption)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .conditions import Grace, SCALE_UP_GRACE_SECONDS, Verdict, _timestamp, within_grace


def _sentence(text: str) -> str:
    """`text` without the full stop it may end with, so that a sentence can follow (scheduler messages end with
    one, sometimes two)."""
    return text.strip().rstrip(".").rstrip()


@dataclass(frozen=True)
class Retries:
    """The RayJob's retry budget: `used` failed attempts (KubeRay's status.failed) of `limit` (spec.backoffLimit).
    `resumes`: a retried attempt continues from the last checkpoint (FineTune with training.resume auto)."""

    limit: int = 0
    used: int = 0
    resumes: bool = False

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)

    def budget(self) -> str:
        return f"{self.used} of {self.limit} retries used"

    @property
    def reason(self) -> str:
        return "Resuming" if self.resumes else "Retrying"

    def restart(self) -> str:
        return ("a new Ray cluster starts and training resumes from the last complete checkpoint" if self.resumes
                else "a new Ray cluster starts and runs the job again")


@dataclass(frozen=True)
class PodProblem:
    reason: str   # Unschedulable | ImagePullBackOff | ErrImagePull | CrashLoopBackOff | ...
    message: str
    pod: str
    since: str | None = None   # when the pod got into this state (a condition's lastTransitionTime), if known


PREEMPTED = "Preempted"
PODS_REFUSED = "PodsRefused"   # KubeRay could not create a Ray pod (the RayCluster's ReplicaFailure condition)
RAY_CLUSTER_LABEL = "ray.io/cluster"   # KubeRay's label: the RayCluster (one per attempt of a job) a Ray pod is in
RAY_NODE_TYPE_LABEL = "ray.io/node-type"   # KubeRay's label: head or worker
DISRUPTIONS = {
    "DeletionByTaintManager": "its node became unreachable or was tainted NoExecute",
    "DeletionByPodGC": "its node was deleted",
    "TerminationByKubelet": "its node is shutting down",
    "PreemptionByScheduler": "the scheduler preempted it for a higher-priority pod",
    "EvictionByEvictionAPI": "it was evicted, as a node drain does (a spot interruption handler, a scale-in)",
}
"""Kubernetes' DisruptionTarget condition reasons: a pod that goes away with its node (a spot instance reclaimed,
a node pool scaled in) rather than because its program failed."""
NODE_SHUTDOWN_REASONS = ("Terminated", "Shutdown", "NodeShutdown")
"""Pod status.reason of a pod the kubelet ended for a node shutdown (graceful node shutdown)."""


def preemption_verdict(problems: list[PodProblem], retries: Retries, deployment: str, previous_reason: str,
                       previous_used: int | None) -> Verdict | None:
    """A Ray pod lost with its node, from then until KubeRay retries the job (or it fails for good). The Ray
    job notices the lost worker only later, and the pod is soon deleted: while the attempt is the same one
    (retries used unchanged) and still running, a Preempted status stays."""
    lost = [p for p in problems if p.reason == PREEMPTED]
    if not lost and not (previous_reason == PREEMPTED and previous_used == retries.used
                         and deployment == "Running"):
        return None
    cause = f"pod {lost[0].pod} was lost with its node: {_sentence(lost[0].message)}" if lost \
        else "a Ray pod was lost with its node"
    if retries.left:
        then = f"once the Ray job notices, KubeRay retries it and {retries.restart()}"
    else:
        then = ("no retry is left, so the job will fail; set spec.backoffLimit to let KubeRay retry jobs whose "
                "nodes go away")
    return Verdict("Running", "progressing", PREEMPTED, f"{cause}; {then} ({retries.budget()})")


# KubeRay's states of a RayJob that has not started: a queued job sits in them until Kueue admits it.
def unschedulable_verdict(problems: list[PodProblem], now: float | None, advice: str,
                          phase: str = "Pending", reason: str = "Unschedulable", lead: str = "") -> Verdict | None:
    """Pods the scheduler cannot place: a wait while a node pool may be scaling up, Stalled once it has lasted
    SCALE_UP_GRACE_SECONDS. None when every pod could be placed."""
    unschedulable = sorted((p for p in problems if p.reason == "Unschedulable"),
                           key=lambda p: _timestamp(p.since) or float("inf"))
    if not unschedulable:
        return None
    p = unschedulable[0]   # the one waiting longest
    found = Verdict(phase, "stalled", reason, f"{lead}pod {p.pod} cannot be scheduled: {_sentence(p.message)}")
    return within_grace(found, Grace(p.since, SCALE_UP_GRACE_SECONDS), now,
                        "A node pool may be adding a node: waiting for one that fits",
                        f"No node has fit it for {int(SCALE_UP_GRACE_SECONDS // 60)} minutes", advice)


def _progress_text(progress: Any) -> str:
    if isinstance(progress, Mapping):
        return ", ".join(f"{k} {v}" for k, v in progress.items())
    return str(progress)


def pod_problems(pods: list[Mapping[str, Any]]) -> list[PodProblem]:
    """What keeps pods from running, read from their status."""
    problems = []
    for pod in pods:
        name = pod.get("metadata", {}).get("name", "?")
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable":
                problems.append(PodProblem("Unschedulable", cond.get("message", ""), name,
                                           cond.get("lastTransitionTime")))
        disrupted = next((c for c in status.get("conditions") or [] if c.get("type") == "DisruptionTarget"
                          and c.get("status") == "True" and c.get("reason") in DISRUPTIONS), None)
        if disrupted is not None:
            problems.append(PodProblem(PREEMPTED, disrupted.get("message") or DISRUPTIONS[disrupted["reason"]],
                                       name, disrupted.get("lastTransitionTime")))
        elif status.get("reason") in NODE_SHUTDOWN_REASONS and status.get("phase") == "Failed":
            problems.append(PodProblem(PREEMPTED, status.get("message") or "its node shut down", name))
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff",
                                         CONTAINER_CONFIG):
                problems.append(PodProblem(waiting["reason"], waiting.get("message", ""), name))
            if driver_error := _driver_error(cs):
                problems.append(PodProblem(GPU_DRIVER_TOO_OLD, driver_error, name))
    return problems


# ---- the kubelet cannot make the container: a Secret it names is missing, or it would run as root ---------------
CONTAINER_CONFIG = "CreateContainerConfigError"
CONTAINER_CONFIG_FAILED = "ContainerConfigError"


def container_config_verdict(problems: list[PodProblem]) -> Verdict | None:
    found = [p for p in problems if p.reason == CONTAINER_CONFIG]
    if not found:
        return None
    p = found[0]
    if "runAsNonRoot" in p.message:
        fix = ("The operator setting ray_pod_security: restricted runs the Ray pods as non-root: use an image whose "
               "USER is numeric and not 0 (spec.image, or the operator's image settings), or set ray_pod_security: "
               "baseline where the namespace allows it (docs/clusters.md)")
    else:
        fix = ("Create what it names (a Secret spec.secrets names, or a key in it); the kubelet keeps "
               "trying and the pod starts by itself")
    return Verdict("Pending", "stalled", CONTAINER_CONFIG_FAILED,
                   f"pod {p.pod} cannot start its container: {_sentence(p.message)}. {fix}")


# ---- the GPU driver is older than the image's CUDA ------------------------------------------------------------
GPU_DRIVER_TOO_OLD = "GPUDriverTooOld"
DRIVER_FLOOR = 580
"""The NVIDIA driver CUDA 13 needs (the Ray images' CUDA); docs/clusters.md says how to check it per cloud."""
_DRIVER_ERROR = re.compile(
    r"unsatisfied condition: cuda|CUDA driver version is insufficient|NVIDIA driver on your system is too old"
    r"|please update your (?:GPU |NVIDIA )?driver|forward compatibility was attempted on non supported HW",
    re.IGNORECASE)


def _driver_error(container_status: Mapping[str, Any]) -> str:
    """The message of a container that cannot start CUDA on this node's driver: the NVIDIA container runtime
    refuses to create it (its `cuda>=` requirement), or CUDA fails in it (the log tail the container leaves as
    its termination message)."""
    states = (container_status.get("state") or {}, container_status.get("lastState") or {})
    for state in states:
        for part in ("waiting", "terminated"):
            message = (state.get(part) or {}).get("message") or ""
            if _DRIVER_ERROR.search(message):
                return message
    return ""


def pod_problem_verdict(problems: list[PodProblem], now: float | None, unschedulable_hint: str,
                        image_hint: str) -> Verdict | None:
    """What the Ray pods' own problems say, in order: no node takes them, the GPU driver is too old, the image
    cannot be pulled; None when none applies. The hints end each message with the kind's own fix."""
    refused = [p for p in problems if p.reason == PODS_REFUSED]
    if refused:
        p = refused[0]
        return Verdict("Pending", "stalled", PODS_REFUSED,
                       f"KubeRay cannot create the pods of Ray cluster {p.pod}: {_sentence(p.message)}. Check the "
                       "namespace's Pod Security level (the Ray pods meet baseline; the operator setting "
                       "ray_pod_security: restricted makes them meet restricted) and its ResourceQuotas "
                       "(docs/clusters.md); KubeRay keeps trying")
    unschedulable = unschedulable_verdict(problems, now, unschedulable_hint)
    if unschedulable is not None:
        return unschedulable
    if driver := driver_verdict(problems):
        return driver
    if config := container_config_verdict(problems):
        return config
    pulling = [p for p in problems if p.reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")]
    if pulling:
        p = pulling[0]
        return Verdict("Pending", "stalled", "ImagePullFailed",
                       f"pod {p.pod} cannot pull its image: {_sentence(p.message)}. {image_hint}")
    return None


def driver_verdict(problems: list[PodProblem]) -> Verdict | None:
    found = [p for p in problems if p.reason == GPU_DRIVER_TOO_OLD]
    if not found:
        return None
    p = found[0]
    return Verdict("Pending", "stalled", GPU_DRIVER_TOO_OLD,
                   f"pod {p.pod} cannot use its GPU: {p.message.strip()[-500:]}. The image's CUDA 13 needs NVIDIA "
                   f"driver {DRIVER_FLOOR} or newer on the GPU nodes: upgrade the node pool's driver "
                   "(docs/clusters.md) or use an image built for the CUDA the installed driver supports")
