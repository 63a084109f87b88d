"""A model cache's part of a reconcile: create the claim and the download Job, judge where the download stands
(from what observe saw: the Job, its report, its pod), and hold the Ray work back until the model is cached."""

from __future__ import annotations

from typing import Any, Mapping

from ..api.common import ModelCacheStatus, StatusBase
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


def cache_status(model: modelcache.CachedModel, state: str, report: Mapping[str, Any]) -> ModelCacheStatus:
    progress = report.get("progress") if isinstance(report.get("progress"), dict) else {}
    counts = {key: progress[key] for key in ("bytesDone", "bytesTotal", "files") if isinstance(progress.get(key), int)}
    return ModelCacheStatus.model_validate({"state": state, "claimName": model.name, "source": model.source,
                                            "jobName": model.name, **counts})


def with_cache(cache: ModelCacheStatus) -> StatusBase:
    """The part of a status that says where the model cache stands."""
    return StatusBase(model_cache=cache)


def where(model: modelcache.CachedModel, field: str) -> str:
    return f"{model.source} into PersistentVolumeClaim {model.name} ({field})"


def decide(model: modelcache.CachedModel, field: str, recorded: ModelCacheStatus | None,
           job: Mapping[str, Any] | None, report_data: Mapping[str, str] | None, now: float,
           problems: list[PodProblem] | None = None) -> tuple[Verdict | None, ModelCacheStatus | None]:
    """(None, the cache's status) once the model is cached; else (the verdict while it downloads or after it
    failed, carrying the cache's status, None).
    Pure: the Job's status, the download's report and its pod's problems in, the decision out."""
    if recorded and recorded.source not in (None, model.source):
        return Verdict("Failed", "stalled", "ModelCacheFailed", (
            f"PersistentVolumeClaim {model.name} ({field}) holds {recorded.source}, but the model is now "
            f"{model.source}: a cache downloads one model. Put the source back, or delete this resource and create "
            "it again"), with_cache(recorded)), None
    if recorded and recorded.state == CACHED and recorded.claim_name == model.name:
        return None, recorded   # decided once; the Job may be gone since (ttl, a cleanup)
    report = result_report(report_data)
    failed = job_condition(job, "Failed")
    if report.get("state") == "Failed" or failed is not None:
        why = report.get("message") or (failed or {}).get("message") or "the download Job failed"
        return Verdict("Failed", "stalled", "ModelCacheFailed", (
            f"downloading {where(model, field)} failed: {why}. Fix the cause (the model's name or revision, "
            f"spec.secrets, the claim's size in {field}.size) and create this resource again"),
            with_cache(cache_status(model, FAILED, report))), None
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
                with_cache(status.model_copy(update={"state": FAILED}))), None
        return Verdict("Pending", "progressing", "CachingModel",
                       f"the Job downloading {where(model, field)} completed; reading its report",
                       with_cache(status), recheck_after=REPORT_GRACE_SECONDS), None
    blocked = pod_problem_verdict(problems or [], now, (
        f"Check that the claim {model.name} can be provisioned: a StorageClass that offers "
        f"{model.cache.access_mode} ({field}.storageClassName, {field}.accessMode)"), "Check spec.image")
    if blocked is not None and blocked.state == "stalled":
        return Verdict(blocked.phase, "stalled", blocked.reason, f"downloading {where(model, field)}: "
                       f"{blocked.message}", with_cache(status)), None
    if status.bytes_total is not None:
        done = f"{gib(status.bytes_done or 0)} of {gib(status.bytes_total)}"
    elif blocked is not None:
        done = blocked.message
    else:
        done = "listing the model's files" if job is not None else "starting the download Job"
    return Verdict("Pending", "progressing", "CachingModel",
                   f"downloading {where(model, field)}: {done}; the Ray work starts once it is cached",
                   with_cache(status)), None


def with_cache_status(outcome: Outcome, cache: ModelCacheStatus | None) -> Outcome:
    """The work's outcome, its status also saying where the cache stands."""
    if cache is not None:
        outcome.verdict = outcome.verdict.with_fields(with_cache(cache))
    return outcome


def stage(seen: CacheSeen, owner: Owner, status: StatusBase, model: modelcache.CachedModel | None,
          field: str, spec: Any, image: str, ctx: BuildContext, now: float
          ) -> tuple[Verdict | None, list[dict[str, Any]], ModelCacheStatus | None]:
    """(verdict while not cached, the cache's children to apply, the cache's status once cached). The children
    are applied until the Job exists; the Job and the claim are then left as they are (a Job's pod template
    cannot change)."""
    if model is None:
        return None, [], None
    verdict, cached = decide(model, field, status.model_cache, seen.job, seen.report, now, list(seen.problems))
    if verdict is None:
        return None, [], cached
    children: list[dict[str, Any]] = []
    if seen.job is None and verdict.state != "stalled":
        children = modelcache.build(owner, model, spec, image, ctx)
    return verdict, children, None
