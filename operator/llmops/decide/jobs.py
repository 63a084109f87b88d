"""What FineTune and BatchInference share: both run one RayJob and read one result report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..api.common import JobStatus, RetryBudget, StatusBase
from ..builders.common import BuildContext, Owner, UnknownAccelerator, built_from
from ..status import (PODS_REFUSED, PodProblem, Retries, Verdict, job_verdict, queued_verdict, rfc3339,
                      used_retries)
from ..status.conditions import _seconds_since
from .common import Observation, Outcome

TERMINAL = ("Succeeded", "Failed")
QUEUE_RECHECK_SECONDS = 10.0   # how often a queued job's Workload is read again
PODS_LATE_SECONDS = 60.0       # a Ray cluster still short of pods this long after the start: ask why, this often
WORKLOAD_WAIT_SECONDS = 3.0    # ... while Kueue has made none yet (it makes one moments after the RayJob)


@dataclass(frozen=True)
class JobObservation(Observation):
    """What a job's reconcile reads, all of it, as handlers/observe.py found it in the caches."""

    ray: Mapping[str, Any] | None = None   # the RayJob (the watch's, or the one created moments ago)
    report: Mapping[str, Any] = field(default_factory=dict)   # the payload's result report, decoded
    problems: tuple[PodProblem, ...] = ()   # the current attempt's pods' problems (a pod lost with its node too)
    queued_on: str = ""              # the RayJob's uid while it waits in a Kueue queue
    workload: Mapping[str, Any] | None = None   # ... and the Workload Kueue made for it, once read
    applied_for: str | None = None   # what the applied children were built from (`built_from`; None: unknown)
    ray_pods: int = 0                # the current Ray cluster's pods seen

    @property
    def finished(self) -> bool:
        """The status records the end of this generation's run: a finished job is never started again."""
        return self.status.phase in TERMINAL and self.status.observed_generation == self.owner.generation


def kept(status: JobStatus) -> Verdict:
    """A finished run's verdict, as its status already says."""
    ready = next((c for c in status.conditions or [] if c.type == "Ready"), None)
    phase = status.phase or "Failed"
    rest = status.model_copy(update={"phase": None, "conditions": None, "observed_generation": None, "message": None})
    return Verdict(phase, "ready" if phase == "Succeeded" else "stalled", ready.reason if ready else phase,
                   status.message or "", rest)


def status_reason(status: StatusBase) -> str:
    """The reason the status gave last (its conditions all carry the same one)."""
    return next((c.reason for c in status.conditions or []), "")


def simulated_mark(metrics: Mapping[str, Any]) -> dict[str, bool]:
    """`{"simulated": True}` when the report's figures came from the local plane's simulator, so status says so
    (the report's keys: the metrics models read them as they are on the wire)."""
    return {"simulated": True} if metrics.get("simulated") is True else {}


def decide_job(obs: JobObservation, ctx: BuildContext, kind: str, ray_name: str,
               build: Callable[[Owner, Any, BuildContext], list[dict[str, Any]]],
               result_fields: Callable[[Mapping[str, Any]], dict[str, Any]],
               extra_fields: dict[str, Any] | None = None) -> Outcome:
    """The RayJob to have and the status it makes, for a job whose spec is valid and whose inputs are there.
    `result_fields` gives the status fields the report makes, `extra_fields` the kind's own (both by field name,
    as the kind's status model takes them)."""
    if obs.finished:
        return Outcome([], kept(obs.status))
    status, ray, report, spec = obs.status, obs.ray, obs.report, obs.spec
    current = ((ray or {}).get("status") or {}).get("rayClusterName")
    retries = Retries(limit=spec.backoff_limit, used=used_retries(ray),
                      resumes=getattr(getattr(spec, "training", None), "resume", "never") == "auto")
    previous = status.retries.used if status.retries else None
    # A job's cluster is whole with its head and spec.resources.workers workers (the builder's one worker group;
    # the cached Ray object carries no spec to count them from). Short of that, what KubeRay could not create
    # says nothing else.
    short = bool(current) and obs.ray_pods < 1 + spec.resources.workers
    problems = [p for p in obs.problems if p.reason != PODS_REFUSED or short]
    verdict = job_verdict(kind, spec.suspend, ray, report, problems, obs.now,
                          started=bool(status.start_time), ray_name=ray_name, retries=retries,
                          previous_reason=status_reason(status), previous_used=previous)
    if obs.queued_on:
        verdict = queued_verdict(spec.queue_name, ray, obs.workload) or verdict

    fields: dict[str, Any] = {"ray_job_name": ray_name, **(extra_fields or {}),
                              "retries": RetryBudget(used=retries.used, limit=retries.limit)}
    if current:
        fields["ray_cluster_name"] = current
    dashboard = ((ray or {}).get("status") or {}).get("dashboardURL")
    if dashboard:
        fields["dashboard_url"] = dashboard
    if status.start_time or ray is not None:
        fields["start_time"] = status.start_time or rfc3339(obs.now)
    if verdict.phase in TERMINAL:
        fields["completion_time"] = status.completion_time or rfc3339(obs.now)
    if report.get("progress") and verdict.phase == "Running":
        fields["progress"] = report["progress"]
    fields.update(result_fields(report))
    verdict = verdict.with_fields(type(status)(**fields))
    if verdict.reason == "RayJobDeleted":
        # Never re-created: whoever deleted it stopped the run. Checked against the API server first, since
        # the decision is final and the watch may lag.
        return Outcome([], verdict, confirm_absent=("ray.io/v1", "RayJob", ray_name))

    # The children depend on nothing else.
    memo_key = built_from(ctx, obs.owner, sorted((extra_fields or {}).items()))
    children: list[dict[str, Any]] = []
    if ray is None or obs.applied_for != memo_key:
        try:
            children = build(obs.owner, spec, ctx)
        except UnknownAccelerator as e:
            return Outcome([], Verdict("Failed", "stalled", "UnknownAccelerator", str(e)))
    if obs.queued_on:   # Kueue's reason changes without an event we watch: read it again now and then
        again = QUEUE_RECHECK_SECONDS if obs.workload else WORKLOAD_WAIT_SECONDS
        return Outcome(children, verdict, memo_key=memo_key, queued=obs.queued_on, requeue_after=again)
    if short and verdict.reason in ("RayClusterStarting", PODS_REFUSED):
        # Pods KubeRay cannot create send no event we watch: once they are late, ask its RayCluster now and then.
        waited = _seconds_since(status.start_time, obs.now) if status.start_time else 0.0
        if waited >= PODS_LATE_SECONDS:
            return Outcome(children, verdict, memo_key=memo_key, check_cluster=current,
                           requeue_after=PODS_LATE_SECONDS)
        return Outcome(children, verdict, memo_key=memo_key, requeue_after=PODS_LATE_SECONDS - waited + 1)
    return Outcome(children, verdict, memo_key=memo_key, requeue_after=verdict.recheck_after)

