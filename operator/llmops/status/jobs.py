"""A RayJob (KubeRay's status), the payload's report and the queue -> a FineTune's or BatchInference's verdict."""

from __future__ import annotations

import json
from typing import Any, Mapping

from .conditions import REPORT_GRACE_SECONDS, Verdict, _seconds_since
from .pods import PodProblem, Retries, _progress_text, _sentence, pod_problem_verdict, preemption_verdict

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


def ray_job_deleted(kind: str, ray_name: str) -> Verdict:
    return Verdict("Failed", "stalled", "RayJobDeleted",
                   f"RayJob {ray_name} was deleted before the job finished; the operator does not start a paid GPU "
                   f"run again on its own. To run it again, delete this {kind} and create it again (or apply it "
                   "under a new name); to pause a run, set spec.suspend rather than deleting its RayJob")


def used_retries(ray_job: Mapping[str, Any] | None) -> int:
    return int(((ray_job or {}).get("status") or {}).get("failed") or 0)


def job_verdict(kind: str, suspended: bool, ray_job: Mapping[str, Any] | None, report: Mapping[str, Any],
                problems: list[PodProblem], now: float | None = None, started: bool = False,
                ray_name: str = "", retries: Retries = Retries(), previous_reason: str = "",
                previous_used: int | None = None) -> Verdict:
    """Map a RayJob (jobDeploymentStatus + jobStatus + reason; it has no conditions) and the payload's report.
    `started`: the RayJob was there before (status.startTime is set), so its absence means someone deleted it.
    `previous_reason` and `previous_used`: what the status said before, so that `Preempted` lasts from the pod's
    loss until KubeRay retries the job, although the lost pod itself is soon gone."""
    status = (ray_job or {}).get("status") or {}
    deployment = status.get("jobDeploymentStatus", "")
    job_status = status.get("jobStatus", "")
    reason = status.get("reason", "")
    ray_message = status.get("message", "")
    state = report.get("state")

    if state == "Succeeded":
        return Verdict("Succeeded", "ready", "Succeeded", report.get("message") or f"{kind} finished")
    if state == "Failed" and (retries.limit == 0 or deployment == "Failed"):
        # With retries, KubeRay decides when the job has failed: a report may be an attempt's that it retries.
        return Verdict("Failed", "stalled", "PayloadFailed", report.get("message") or "the job reported failure")
    if ray_job is None or (ray_job.get("metadata") or {}).get("deletionTimestamp"):
        if started:
            return ray_job_deleted(kind, ray_name or "of this run")
        if suspended:
            return Verdict("Suspended", "suspended", "Suspended", "spec.suspend is true: no Ray cluster is running")
        return Verdict("Pending", "progressing", "Creating", "creating the RayJob")
    if deployment in ("Suspended", "Suspending") and not suspended:
        # Resumed (by the user, or admitted by Kueue) and KubeRay has not acted yet: Suspended here, under the new
        # observedGeneration, would read as settled to GitOps tools.
        return Verdict("Pending", "progressing", "RayClusterStarting",
                       "spec.suspend is false: waiting for KubeRay to start the Ray cluster")
    if deployment in ("Suspended", "Suspending") or (suspended and deployment in ("", "New")):
        return Verdict("Suspended", "suspended", "Suspended",
                       "spec.suspend is true: the Ray cluster is stopped; set it to false to resume")
    if deployment == "ValidationFailed":
        return Verdict("Failed", "stalled", "RayJobInvalid", f"KubeRay rejected the RayJob: {ray_message}")
    if deployment == "Retrying" or (retries.used and deployment in ("", "New", "Initializing")):
        waiting = next((p for p in problems if p.reason == "Unschedulable"), None)
        detail = f"; pod {waiting.pod} waits for a node: {_sentence(waiting.message)}" if waiting else ""
        return Verdict("Running", "progressing", retries.reason,
                       f"attempt {max(retries.used, 1)} ended early: {retries.restart()} ({retries.budget()})"
                       + detail)
    if deployment == "Failed" or (job_status in ("FAILED", "STOPPED") and not retries.left):
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
    preempted = preemption_verdict(problems, retries, deployment, previous_reason, previous_used)
    if preempted is not None:
        return preempted
    if state == "Failed" and retries.left:
        return Verdict("Running", "progressing", retries.reason,
                       f"attempt {retries.used + 1} failed ({_sentence(report.get('message') or 'no message')}); "
                       f"once the RayJob notices, {retries.restart()} ({retries.budget()})")
    blocked = pod_problem_verdict(problems, now, "Check that the accelerator's node pool exists and has free GPUs "
                                                 "(or can add nodes), or change spec.resources",
                                  "Check spec.image and pull secrets")
    if blocked is not None:
        return blocked
    if deployment == "Running" or job_status in ("RUNNING", "PENDING"):
        progress = report.get("progress")
        detail = f" ({_progress_text(progress)})" if progress else ""
        again = f"; attempt {retries.used + 1}, {retries.budget()}" if retries.used else ""
        return Verdict("Running", "progressing", "JobRunning", f"the Ray job is running{detail}{again}")
    return Verdict("Pending", "progressing", "RayClusterStarting",
                   "waiting for the Ray cluster's pods to start" + (f": {ray_message}" if ray_message else ""))


NOT_STARTED = ("", "New", "Suspending", "Suspended")


def queued_verdict(queue: str, ray_job: Mapping[str, Any] | None, workload: Mapping[str, Any] | None
                   ) -> Verdict | None:
    """A job waiting in a Kueue queue, or None once it runs (or has run).

    Kueue's reason comes from the Workload it made for the RayJob, not from its Events: the Workload's
    QuotaReserved condition is Kueue's own record of why the job waits (its reason and message, kept current
    for as long as it waits), where Events are deduplicated, expire, and may never be written at all."""
    status = (ray_job or {}).get("status") or {}
    if ray_job is None or status.get("jobDeploymentStatus", "") not in NOT_STARTED:
        return None
    conditions = {c.get("type"): c for c in ((workload or {}).get("status") or {}).get("conditions") or []}
    if conditions.get("Admitted", {}).get("status") == "True":
        return None   # admitted: Kueue is unsuspending it; KubeRay's status follows
    if workload is None:
        why = "Kueue has made no Workload for it yet (is Kueue running, with its ray.io/rayjob integration?)"
    else:
        pending = conditions.get("QuotaReserved") or conditions.get("Admitted") or {}
        why = f"{pending.get('reason', 'Pending')}: {_sentence(pending.get('message') or 'waiting for quota')}"
    return Verdict("Queued", "progressing", "Queued", f"waiting in Kueue LocalQueue {queue} to be admitted; {why}")
