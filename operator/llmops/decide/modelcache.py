"""A model cache's part of a reconcile: create the claim and the download Job, judge where the download stands
(from what observe saw: the Job, its report, its pod), and hold the Ray work back until the model is cached."""

from __future__ import annotations

from typing import Any, Mapping

from ..api.common import StatusBase
from ..builders import modelcache
from ..builders.common import BuildContext, Owner
from ..status import REPORT_GRACE_SECONDS, PodProblem, Verdict, pod_problem_verdict, result_report
from ..status.conditions import _timestamp
from .common import CacheSeen, Outcome

DOWNLOADING, CACHED, FAILED = "Downloading", "Cached", "Failed"


def gib(count: Any) -> str:
    return f"{count / 2**30:.1f} GiB" if isinstance(count, (int, float)) else "?"


def job_condition(job: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in ((job or {}).get("status") or {}).get("conditions") or []
                 if c.get("type") == type_ and c.get("status") == "True"), None)


def cache_status(model: modelcache.CachedModel, state: str, report: Mapping[str, Any]) -> dict[str, Any]:
    progress = report.get("progress") if isinstance(report.get("progress"), dict) else {}
    fields = {"state": state, "claimName": model.name, "source": model.source, "jobName": model.name}
    for key in ("bytesDone", "bytesTotal", "files"):
        if isinstance(progress.get(key), int):
            fields[key] = progress[key]
    return fields


def where(model: modelcache.CachedModel, field: str) -> str:
    return f"{model.source} into PersistentVolumeClaim {model.name} ({field})"


def decide(model: modelcache.CachedModel, field: str, recorded: Mapping[str, Any] | None,
           job: Mapping[str, Any] | None, report_data: Mapping[str, str] | None, now: float,
           problems: list[PodProblem] | None = None) -> tuple[Verdict | None, dict[str, Any]]:
    """(None, status) once the model is cached; else (the verdict while it downloads or after it failed, status).
    Pure: the Job's status, the download's report and its pod's problems in, the decision out."""
    if recorded and recorded.get("source") not in (None, model.source):
        return Verdict("Failed", "stalled", "ModelCacheFailed", (
            f"PersistentVolumeClaim {model.name} ({field}) holds {recorded['source']}, but the model is now "
            f"{model.source}: a cache downloads one model. Put the source back, or delete this resource and create "
            "it again"), {"modelCache": dict(recorded)}), {}
    if recorded and recorded.get("state") == CACHED and recorded.get("claimName") == model.name:
        return None, dict(recorded)   # decided once; the Job may be gone since (ttl, a cleanup)
    report = result_report(report_data)
    failed = job_condition(job, "Failed")
    if report.get("state") == "Failed" or failed is not None:
        why = report.get("message") or (failed or {}).get("message") or "the download Job failed"
        return Verdict("Failed", "stalled", "ModelCacheFailed", (
            f"downloading {where(model, field)} failed: {why}. Fix the cause (the model's name or revision, "
            f"spec.secrets, the claim's size in {field}.size) and create this resource again"),
            {"modelCache": cache_status(model, FAILED, report)}), {}
    complete = job_condition(job, "Complete")
    if complete is not None and report.get("state") == "Succeeded":
        return None, cache_status(model, CACHED, report)
    status = cache_status(model, DOWNLOADING, report)
    if complete is not None:   # the report and the Job arrive through separate watches
        finished = _timestamp((job or {}).get("status", {}).get("completionTime")) or now
        if now - finished >= REPORT_GRACE_SECONDS:
            return Verdict("Failed", "stalled", "ModelCacheFailed", (
                f"the Job downloading {where(model, field)} completed without reporting that the model is "
                f"complete; see its logs (kubectl logs job/{model.name}), then create this resource again"),
                {"modelCache": {**status, "state": FAILED}}), {}
        return Verdict("Pending", "progressing", "CachingModel",
                       f"the Job downloading {where(model, field)} completed; reading its report",
                       {"modelCache": status}, recheck_after=REPORT_GRACE_SECONDS), {}
    blocked = pod_problem_verdict(problems or [], now, (
        f"Check that the claim {model.name} can be provisioned: a StorageClass that offers "
        f"{model.cache.access_mode} ({field}.storageClassName, {field}.accessMode)"), "Check spec.image")
    if blocked is not None and blocked.state == "stalled":
        return Verdict(blocked.phase, "stalled", blocked.reason, f"downloading {where(model, field)}: "
                       f"{blocked.message}", {"modelCache": status}), {}
    if "bytesTotal" in status:
        done = f"{gib(status.get('bytesDone', 0))} of {gib(status['bytesTotal'])}"
    elif blocked is not None:
        done = blocked.message
    else:
        done = "listing the model's files" if job is not None else "starting the download Job"
    return Verdict("Pending", "progressing", "CachingModel",
                   f"downloading {where(model, field)}: {done}; the Ray work starts once it is cached",
                   {"modelCache": status}), {}


def with_cache_status(outcome: Outcome, fields: dict[str, Any]) -> Outcome:
    """The work's outcome, its status also saying where the cache stands."""
    if fields:
        outcome.verdict.fields.update(fields)
    return outcome


def stage(seen: CacheSeen, owner: Owner, status: StatusBase, model: modelcache.CachedModel | None,
          field: str, spec: Any, image: str, ctx: BuildContext, now: float
          ) -> tuple[Verdict | None, list[dict[str, Any]], dict[str, Any]]:
    """(verdict while not cached, the cache's children to apply, status fields). The children are applied until
    the Job exists; the Job and the claim are then left as they are (a Job's pod template cannot change)."""
    if model is None:
        return None, [], {}
    recorded = status.model_cache.wire() if status.model_cache else None
    verdict, fields = decide(model, field, recorded, seen.job, seen.report, now,
                             list(seen.problems))
    if verdict is None:
        return None, [], {"modelCache": fields}
    children: list[dict[str, Any]] = []
    if seen.job is None and verdict.state != "stalled":
        children = modelcache.build(owner, model, spec, image, ctx)
    return verdict, children, {}
