"""Status: kstatus conditions (Ready / Reconciling / Stalled) and the mapping from KubeRay's child status.

Pure functions: observations in, a `Verdict` out. The handlers turn a verdict into the status they apply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"


@dataclass(frozen=True)
class Verdict:
    """Where a resource stands: phase for printer columns, one reason and message for humans."""

    phase: str
    state: str  # "ready" | "progressing" | "stalled" | "idle"
    reason: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)  # extra status fields (metrics, adapter, ...)


def conditions_for(verdict: Verdict, generation: int, previous: list[dict] | None, now: str) -> list[dict]:
    """Ready/Reconciling/Stalled for a verdict; lastTransitionTime moves only when a status flips."""
    wanted = {
        READY: "True" if verdict.state == "ready" else "False",
        RECONCILING: "True" if verdict.state == "progressing" else "False",
        STALLED: "True" if verdict.state == "stalled" else "False",
    }
    before = {c.get("type"): c for c in previous or []}
    out = []
    for type_, status in wanted.items():
        old = before.get(type_)
        out.append({
            "type": type_,
            "status": status,
            "reason": verdict.reason,
            "message": verdict.message,
            "observedGeneration": generation,
            "lastTransitionTime": old["lastTransitionTime"] if old and old.get("status") == status
            and old.get("lastTransitionTime") else now,
        })
    return out


def same_status(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """True when applying `desired` would change nothing a reader cares about."""
    return _canonical(current or {}) == _canonical(desired)


def _canonical(status: Mapping[str, Any]) -> str:
    return json.dumps(status, sort_keys=True, default=str)


# ---- KubeRay RayJob -> verdict ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PodProblem:
    reason: str   # Unschedulable | ImagePullBackOff | ErrImagePull | CrashLoopBackOff | ...
    message: str
    pod: str


def result_report(data: Mapping[str, str] | None) -> dict[str, Any]:
    """The payload's report from its result ConfigMap, decoded (JSON values parsed, bad JSON ignored)."""
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if key in ("metrics", "progress", "adapter"):
            try:
                out[key] = json.loads(value)
            except (TypeError, ValueError):
                continue
        else:
            out[key] = value
    return out


REPORT_GRACE_SECONDS = 60.0
"""How long a finished RayJob may wait for its result report: the two arrive through separate watches."""


def _seconds_since(timestamp: str | None, now: float | None) -> float:
    if not timestamp or now is None:
        return float("inf")
    import datetime
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("inf")
    return now - then


def job_verdict(kind: str, suspended: bool, ray_job: Mapping[str, Any] | None, report: Mapping[str, Any],
                problems: list[PodProblem], now: float | None = None) -> Verdict:
    """Map a RayJob (jobDeploymentStatus + jobStatus + reason; it has no conditions) and the payload's report."""
    status = (ray_job or {}).get("status") or {}
    deployment = status.get("jobDeploymentStatus", "")
    job_status = status.get("jobStatus", "")
    reason = status.get("reason", "")
    ray_message = status.get("message", "")
    state = report.get("state")

    if state == "Succeeded":
        return Verdict("Succeeded", "ready", "Succeeded", report.get("message") or f"{kind} finished")
    if state == "Failed":
        return Verdict("Failed", "stalled", "PayloadFailed", report.get("message") or "the job reported failure")
    if ray_job is None:
        if suspended:
            return Verdict("Suspended", "idle", "Suspended", "spec.suspend is true: no Ray cluster is running")
        return Verdict("Pending", "progressing", "Creating", "creating the RayJob")
    if deployment in ("Suspended", "Suspending") or (suspended and deployment in ("", "New")):
        return Verdict("Suspended", "idle", "Suspended",
                       "spec.suspend is true: the Ray cluster is stopped; set it to false to resume")
    if deployment == "ValidationFailed":
        return Verdict("Failed", "stalled", "RayJobInvalid", f"KubeRay rejected the RayJob: {ray_message}")
    if deployment == "Failed" or job_status in ("FAILED", "STOPPED"):
        why = {
            "DeadlineExceeded": "spec.activeDeadlineSeconds passed before the job finished; raise it or make the "
                                "job smaller",
            "AppFailed": "the Ray job failed; see the RayJob's driver logs (kubectl logs job/<rayjob>)",
            "SubmissionFailed": "the job could not be submitted to the Ray cluster; see the submitter pod's logs",
            "JobDeploymentStatusTransitionGracePeriodExceeded": "the Ray job stopped answering",
        }.get(reason, "the Ray job failed")
        detail = f": {ray_message}" if ray_message else ""
        return Verdict("Failed", "stalled", reason or "JobFailed", f"{why}{detail}")
    if deployment == "Complete" or job_status == "SUCCEEDED":
        if _seconds_since(status.get("endTime"), now) < REPORT_GRACE_SECONDS:
            return Verdict("Running", "progressing", "CollectingResult",
                           "the Ray job finished; waiting for its result report")
        return Verdict("Failed", "stalled", "NoResultReported",
                       "the Ray job finished but the payload reported no result; see the driver logs")
    unschedulable = [p for p in problems if p.reason == "Unschedulable"]
    if unschedulable:
        p = unschedulable[0]
        return Verdict("Pending", "stalled", "Unschedulable",
                       f"pod {p.pod} cannot be scheduled: {p.message}. Check that the accelerator's node pool "
                       "exists and has free GPUs, or change spec.resources")
    if driver := driver_verdict(problems):
        return driver
    pulling = [p for p in problems if p.reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")]
    if pulling:
        p = pulling[0]
        return Verdict("Pending", "stalled", "ImagePullFailed",
                       f"pod {p.pod} cannot pull its image: {p.message}. Check spec.image and pull secrets")
    if deployment == "Retrying":
        return Verdict("Running", "progressing", "Retrying",
                       f"the Ray job failed and is being retried ({status.get('failed', 0)} failed so far)")
    if deployment == "Running" or job_status in ("RUNNING", "PENDING"):
        progress = report.get("progress")
        detail = f" ({_progress_text(progress)})" if progress else ""
        return Verdict("Running", "progressing", "JobRunning", f"the Ray job is running{detail}")
    return Verdict("Pending", "progressing", "RayClusterStarting",
                   "waiting for the Ray cluster's pods to start" + (f": {ray_message}" if ray_message else ""))


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
                problems.append(PodProblem("Unschedulable", cond.get("message", ""), name))
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CrashLoopBackOff"):
                problems.append(PodProblem(waiting["reason"], waiting.get("message", ""), name))
            if driver_error := _driver_error(cs):
                problems.append(PodProblem(GPU_DRIVER_TOO_OLD, driver_error, name))
    return problems


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


def driver_verdict(problems: list[PodProblem]) -> Verdict | None:
    found = [p for p in problems if p.reason == GPU_DRIVER_TOO_OLD]
    if not found:
        return None
    p = found[0]
    return Verdict("Pending", "stalled", GPU_DRIVER_TOO_OLD,
                   f"pod {p.pod} cannot use its GPU: {p.message.strip()[-500:]}. The image's CUDA 13 needs NVIDIA "
                   f"driver {DRIVER_FLOOR} or newer on the GPU nodes: upgrade the node pool's driver "
                   "(docs/clusters.md) or use an image built for the CUDA the installed driver supports")


# ---- KubeRay RayService -> verdict --------------------------------------------------------------------------
def service_verdict(ray_service: Mapping[str, Any] | None, adapters_summary: str, problems: list[PodProblem],
                    upgrade_strategy: str) -> Verdict:
    """Map a RayService's conditions (Ready, UpgradeInProgress) and application statuses."""
    suffix = f"; {adapters_summary}" if adapters_summary else ""
    if ray_service is None:
        return Verdict("Pending", "progressing", "Creating", "creating the RayService" + suffix)
    status = ray_service.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {})
    upgrading = conditions.get("UpgradeInProgress", {}).get("status") == "True"
    apps = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    failed = {name: app for name, app in apps.items() if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY")}
    unschedulable = [p for p in problems if p.reason == "Unschedulable"]
    if upgrading:
        if unschedulable and upgrade_strategy == "NewCluster":
            return Verdict("Upgrading", "stalled", "UpgradeCannotFit",
                           f"the NewCluster upgrade needs a second Ray cluster (twice the GPUs) and pod "
                           f"{unschedulable[0].pod} cannot be scheduled: {unschedulable[0].message}. Add GPU nodes "
                           "or set spec.upgradeStrategy to None; the current cluster keeps serving" + suffix)
        return Verdict("Upgrading", "progressing", "UpgradeInProgress",
                       "a new Ray cluster is starting; traffic moves to it once it is ready" + suffix)
    if failed:
        name, app = next(iter(failed.items()))
        return Verdict("Failed", "stalled", "ServeApplicationFailed",
                       f"Serve application {name} is {app.get('status')}: {app.get('message', '')}"[:2000])
    if ready.get("status") == "True":
        return Verdict("Ready", "ready", "Serving", "serving" + suffix)
    if unschedulable:
        p = unschedulable[0]
        return Verdict("Pending", "stalled", "Unschedulable",
                       f"pod {p.pod} cannot be scheduled: {p.message}. Check the accelerator's node pool")
    if driver := driver_verdict(problems):
        return driver
    pulling = [p for p in problems if p.reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")]
    if pulling:
        return Verdict("Pending", "stalled", "ImagePullFailed",
                       f"pod {pulling[0].pod} cannot pull its image: {pulling[0].message}. Check spec.image")
    reason = ready.get("reason") or "Initializing"
    return Verdict("Pending", "progressing", reason,
                   f"waiting for the Ray cluster and Serve application ({reason})" + suffix)
