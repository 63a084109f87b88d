"""Status: kstatus conditions (Ready / Reconciling / Stalled) and the mapping from KubeRay's child status.

Pure functions: observations in, a `Verdict` out. The handlers turn a verdict into the status they apply.
`WRITTEN` lists every status the operator writes; docs/gitops.md says how GitOps tools read each one, and
tests hold both to the real clients (kstatus and Argo CD's Lua runtime).
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

READY, RECONCILING, STALLED, SUSPENDED = "Ready", "Reconciling", "Stalled", "Suspended"


@dataclass(frozen=True)
class Verdict:
    """Where a resource stands: phase for printer columns, one reason and message for humans."""

    phase: str
    state: str  # "ready" | "progressing" | "stalled" | "suspended"
    reason: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)  # extra status fields (metrics, adapter, ...)
    recheck_after: float | None = None   # decide again after this many seconds (a grace period ends)


def conditions_for(verdict: Verdict, generation: int, previous: list[dict] | None, now: str) -> list[dict]:
    """The kstatus conditions for a verdict; lastTransitionTime moves only when a status flips.

    Reconciling and Stalled are always there. The third is Ready, except while suspended: kstatus reads
    Ready=False as "in progress", and a suspended resource is where its spec puts it, so it gets Suspended=True
    instead (Ready=True would tell `kubectl wait --for=condition=Ready` that the job is done)."""
    first = (SUSPENDED, "True") if verdict.state == "suspended" else (READY, str(verdict.state == "ready"))
    wanted = {
        first[0]: first[1],
        RECONCILING: str(verdict.state == "progressing"),
        STALLED: str(verdict.state == "stalled"),
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


# ---- grace periods: waits that usually resolve by themselves ----------------------------------------------------
# Stalled means "will not progress until someone changes something". These waits resolve on their own in the
# normal course of things, so they are Reconciling (with their reason) and turn Stalled only once they have
# lasted longer than that could explain.
SCALE_UP_GRACE_SECONDS = 600.0
"""How long pods may stay unschedulable before the resource is Stalled: a GPU node pool that scales up adds a
node, and its drivers, in minutes. Counted from the pod's PodScheduled=False transition."""
DEPENDENCY_GRACE_SECONDS = 300.0
"""How long a BatchInference may name a FineTune that does not exist before it is Stalled, counted from its own
creation: `kubectl apply -f <folder>` and GitOps tools create a set of resources in no particular order."""
REPORT_GRACE_SECONDS = 60.0
"""How long a finished RayJob may wait for its result report: the two arrive through separate watches."""


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _rfc3339(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds_since(timestamp: str | None, now: float | None) -> float:
    then = _timestamp(timestamp)
    return float("inf") if then is None or now is None else now - then


@dataclass(frozen=True)
class Grace:
    """A wait that may last `seconds` from `since` (RFC 3339; unknown counts as just begun) before it stalls."""

    since: str | None
    seconds: float

    def left(self, now: float | None) -> float:
        """Seconds until the wait stalls; <= 0 once over."""
        then = _timestamp(self.since)
        if then is None or now is None:
            return self.seconds
        return then + self.seconds - now

    def deadline(self, now: float | None) -> str:
        then = _timestamp(self.since)
        return _rfc3339((then if then is not None else now or 0.0) + self.seconds)


def within_grace(verdict: Verdict, grace: Grace, now: float | None, waiting: str, stalled: str,
                 advice: str) -> Verdict:
    """`verdict` (a stalled one) as a wait while the grace period lasts: Reconciling with the same reason, a
    message that says until when, and a recheck when it ends. Afterwards Stalled, saying how long it waited."""
    left = grace.left(now)
    if left > 0:
        return Verdict(verdict.phase, "progressing", verdict.reason,
                       f"{verdict.message}. {waiting} until {grace.deadline(now)}, then this stalls. {advice}",
                       verdict.fields, recheck_after=left + 1)
    return Verdict(verdict.phase, "stalled", verdict.reason, f"{verdict.message}. {stalled}. {advice}",
                   verdict.fields)


# ---- KubeRay RayJob -> verdict ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PodProblem:
    reason: str   # Unschedulable | ImagePullBackOff | ErrImagePull | CrashLoopBackOff | ...
    message: str
    pod: str
    since: str | None = None   # when the pod got into this state (a condition's lastTransitionTime), if known


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


RAY_JOB_FAILURES = {
    "DeadlineExceeded": "spec.activeDeadlineSeconds passed before the job finished; raise it or make the job smaller",
    "AppFailed": "the Ray job failed; see the RayJob's driver logs (kubectl logs job/<rayjob>)",
    "SubmissionFailed": "the job could not be submitted to the Ray cluster; see the submitter pod's logs",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "the Ray job stopped answering",
}
"""KubeRay's RayJob failure reasons (status.reason) the operator passes on as its own reason; any other failure
reads `JobFailed`."""


def _sentence(text: str) -> str:
    """`text` without the full stop it may end with, so that a sentence can follow (scheduler messages end with
    one, sometimes two)."""
    return text.strip().rstrip(".").rstrip()


def ray_job_deleted(kind: str, ray_name: str) -> Verdict:
    return Verdict("Failed", "stalled", "RayJobDeleted",
                   f"RayJob {ray_name} was deleted before the job finished; the operator does not start a paid GPU "
                   f"run again on its own. To run it again, delete this {kind} and create it again (or apply it "
                   "under a new name); to pause a run, set spec.suspend rather than deleting its RayJob")


def job_verdict(kind: str, suspended: bool, ray_job: Mapping[str, Any] | None, report: Mapping[str, Any],
                problems: list[PodProblem], now: float | None = None, started: bool = False,
                ray_name: str = "") -> Verdict:
    """Map a RayJob (jobDeploymentStatus + jobStatus + reason; it has no conditions) and the payload's report.
    `started`: the RayJob was there before (status.startTime is set), so its absence means someone deleted it."""
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
    if ray_job is None or (ray_job.get("metadata") or {}).get("deletionTimestamp"):
        if started:
            return ray_job_deleted(kind, ray_name or "of this run")
        if suspended:
            return Verdict("Suspended", "suspended", "Suspended", "spec.suspend is true: no Ray cluster is running")
        return Verdict("Pending", "progressing", "Creating", "creating the RayJob")
    if deployment in ("Suspended", "Suspending") or (suspended and deployment in ("", "New")):
        return Verdict("Suspended", "suspended", "Suspended",
                       "spec.suspend is true: the Ray cluster is stopped; set it to false to resume")
    if deployment == "ValidationFailed":
        return Verdict("Failed", "stalled", "RayJobInvalid", f"KubeRay rejected the RayJob: {ray_message}")
    if deployment == "Failed" or job_status in ("FAILED", "STOPPED"):
        why = RAY_JOB_FAILURES.get(reason, "the Ray job failed")
        detail = f": {ray_message}" if ray_message else ""
        return Verdict("Failed", "stalled", reason if reason in RAY_JOB_FAILURES else "JobFailed", f"{why}{detail}")
    if deployment == "Complete" or job_status == "SUCCEEDED":
        waited = _seconds_since(status.get("endTime"), now)
        if waited < REPORT_GRACE_SECONDS:
            return Verdict("Running", "progressing", "CollectingResult",
                           "the Ray job finished; waiting for its result report",
                           recheck_after=REPORT_GRACE_SECONDS - waited + 1)
        return Verdict("Failed", "stalled", "NoResultReported",
                       "the Ray job finished but the payload reported no result; see the driver logs")
    blocked = pod_problem_verdict(problems, now, "Check that the accelerator's node pool exists and has free GPUs "
                                                 "(or can add nodes), or change spec.resources",
                                  "Check spec.image and pull secrets")
    if blocked is not None:
        return blocked
    if deployment == "Retrying":
        return Verdict("Running", "progressing", "Retrying",
                       f"the Ray job failed and is being retried ({status.get('failed', 0)} failed so far)")
    if deployment == "Running" or job_status in ("RUNNING", "PENDING"):
        progress = report.get("progress")
        detail = f" ({_progress_text(progress)})" if progress else ""
        return Verdict("Running", "progressing", "JobRunning", f"the Ray job is running{detail}")
    return Verdict("Pending", "progressing", "RayClusterStarting",
                   "waiting for the Ray cluster's pods to start" + (f": {ray_message}" if ray_message else ""))


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


def pod_problem_verdict(problems: list[PodProblem], now: float | None, unschedulable_hint: str,
                        image_hint: str) -> Verdict | None:
    """What the Ray pods' own problems say, in order: no node takes them, the GPU driver is too old, the image
    cannot be pulled; None when none applies. The hints end each message with the kind's own fix."""
    unschedulable = unschedulable_verdict(problems, now, unschedulable_hint)
    if unschedulable is not None:
        return unschedulable
    if driver := driver_verdict(problems):
        return driver
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


# ---- KubeRay RayService -> verdict --------------------------------------------------------------------------
RAY_SERVICE_WAITING = ("Initializing", "ZeroServeEndpoints")
"""KubeRay's RayService Ready=False reasons (KubeRay 1.5), passed on while the service starts or has lost its
endpoints. (Its InitializingTimeout needs an annotation the operator does not set.)"""


def service_verdict(ray_service: Mapping[str, Any] | None, adapters_summary: str, problems: list[PodProblem],
                    upgrade_strategy: str, now: float | None = None) -> Verdict:
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
    if upgrading:
        if upgrade_strategy == "NewCluster":
            cannot_fit = unschedulable_verdict(
                problems, now, "Add GPU nodes or set spec.upgradeStrategy to None; the current cluster keeps serving",
                phase="Upgrading", reason="UpgradeCannotFit",
                lead="the NewCluster upgrade needs a second Ray cluster (twice the GPUs) and ")
            if cannot_fit is not None:
                return Verdict(cannot_fit.phase, cannot_fit.state, cannot_fit.reason, cannot_fit.message + suffix,
                               recheck_after=cannot_fit.recheck_after)
        return Verdict("Upgrading", "progressing", "UpgradeInProgress",
                       "a new Ray cluster is starting; traffic moves to it once it is ready" + suffix)
    if failed:
        name, app = next(iter(failed.items()))
        return Verdict("Failed", "stalled", "ServeApplicationFailed",
                       f"Serve application {name} is {app.get('status')}: {app.get('message', '')}"[:2000])
    if ready.get("status") == "True":
        return Verdict("Ready", "ready", "Serving", "serving" + suffix)
    blocked = pod_problem_verdict(problems, now, "Check the accelerator's node pool, or change spec.resources",
                                  "Check spec.image")
    if blocked is not None:
        return blocked
    reason = ready.get("reason") or "Initializing"
    return Verdict("Pending", "progressing", reason,
                   f"waiting for the Ray cluster and Serve application ({reason})" + suffix)


# ---- every status the operator writes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Written:
    """One status the operator writes: a phase, a state (which conditions are True) and a reason, for some kinds."""

    kinds: tuple[str, ...]
    phase: str
    state: str
    reason: str


JOBS = ("FineTune", "BatchInference")
SERVICES = ("LLMService",)
EVERY_KIND = JOBS + SERVICES

WRITTEN: tuple[Written, ...] = (
    # any kind
    Written(EVERY_KIND, "Pending", "progressing", "Creating"),
    Written(EVERY_KIND, "Pending", "progressing", "WaitingForPreviousRun"),
    Written(EVERY_KIND, "Pending", "progressing", "Unschedulable"),   # within SCALE_UP_GRACE_SECONDS
    Written(EVERY_KIND, "Pending", "stalled", "Unschedulable"),
    Written(EVERY_KIND, "Pending", "stalled", "ImagePullFailed"),
    Written(EVERY_KIND, "Pending", "stalled", GPU_DRIVER_TOO_OLD),
    Written(EVERY_KIND, "Suspended", "suspended", "Suspended"),
    Written(EVERY_KIND, "Failed", "stalled", "InvalidSpec"),
    Written(EVERY_KIND, "Failed", "stalled", "UnknownAccelerator"),
    Written(EVERY_KIND, "Failed", "stalled", "ApplyFailed"),
    # FineTune and BatchInference: one RayJob each
    Written(JOBS, "Pending", "progressing", "RayClusterStarting"),
    Written(JOBS, "Running", "progressing", "JobRunning"),
    Written(JOBS, "Running", "progressing", "Retrying"),
    Written(JOBS, "Running", "progressing", "CollectingResult"),
    Written(JOBS, "Succeeded", "ready", "Succeeded"),
    Written(JOBS, "Failed", "stalled", "PayloadFailed"),
    Written(JOBS, "Failed", "stalled", "NoResultReported"),
    Written(JOBS, "Failed", "stalled", "RayJobInvalid"),
    Written(JOBS, "Failed", "stalled", "RayJobDeleted"),
    Written(JOBS, "Failed", "stalled", "JobFailed"),
    *(Written(JOBS, "Failed", "stalled", reason) for reason in RAY_JOB_FAILURES),
    # BatchInference with spec.model.fineTuneRef
    Written(("BatchInference",), "Waiting", "progressing", "WaitingForFineTune"),
    Written(("BatchInference",), "Waiting", "progressing", "FineTuneNotFound"),   # within DEPENDENCY_GRACE_SECONDS
    Written(("BatchInference",), "Waiting", "stalled", "FineTuneNotFound"),
    Written(("BatchInference",), "Pending", "stalled", "FineTuneFailed"),
    # LLMService: one RayService
    *(Written(SERVICES, "Pending", "progressing", reason) for reason in RAY_SERVICE_WAITING),
    Written(SERVICES, "Ready", "ready", "Serving"),
    Written(SERVICES, "Ready", "ready", "ServingWithAdaptersPending"),
    Written(SERVICES, "Upgrading", "progressing", "UpgradeInProgress"),
    Written(SERVICES, "Upgrading", "progressing", "UpgradeCannotFit"),   # within SCALE_UP_GRACE_SECONDS
    Written(SERVICES, "Upgrading", "stalled", "UpgradeCannotFit"),
    Written(SERVICES, "Failed", "stalled", "ServeApplicationFailed"),
    Written(SERVICES, "Failed", "stalled", "InvalidServeConfig"),
)
"""Every (phase, state, reason) the operator writes, by kind. A unit test checks it against the code's own
verdicts; docs/gitops.md has a row for each, and the contract test holds the real clients to those rows."""
