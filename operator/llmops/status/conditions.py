"""kstatus conditions (Ready / Reconciling / Stalled) from a verdict, and the waits that turn Stalled only
after a grace period."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from ..api.common import StatusBase

READY, RECONCILING, STALLED, SUSPENDED = "Ready", "Reconciling", "Stalled", "Suspended"


@dataclass(frozen=True)
class Verdict:
    """Where a resource stands: phase for printer columns, one reason and message for humans."""

    phase: str
    state: str  # "ready" | "progressing" | "stalled" | "suspended"
    reason: str
    message: str
    fields: StatusBase | None = None   # the rest of the status it makes (the kind's model, only what it sets)
    recheck_after: float | None = None   # decide again after this many seconds (a grace period ends)

    def with_fields(self, fields: StatusBase) -> Verdict:
        """This verdict, its status also setting what `fields` sets (that wins over what it set already)."""
        return replace(self, fields=merged(self.fields, fields))


def merged(first: StatusBase | None, then: StatusBase) -> StatusBase:
    """What both statuses set, `then`'s values winning, in the more specific of their two models (a model cache's
    part is a StatusBase, a FineTune's status a subclass of it)."""
    if first is None:
        return then
    model = type(first) if isinstance(first, type(then)) else type(then)
    values = {name: getattr(first, name) for name in first.model_fields_set}
    values.update((name, getattr(then, name)) for name in then.model_fields_set)
    return model(**values)


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
    return json.dumps(_numbers(status), sort_keys=True, default=str)


def _numbers(value: Any) -> Any:
    """1.0 as 1: the API server writes a whole float back as an integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


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
DEPENDENCY_RECHECK_SECONDS = 15.0
"""A resource that waits on another (a BatchInference on its FineTune, a service's adapters on FineTunes and
gates) is woken by the other's status events, and also reads it again this often: a wake-up that comes before
the cache holds the new status must not leave it waiting for good. A re-read costs no API request."""
REPORT_GRACE_SECONDS = 60.0
"""How long a finished RayJob may wait for its result report: the two arrive through separate watches."""


def _timestamp(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def rfc3339(seconds: float) -> str:
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
        return rfc3339((then if then is not None else now or 0.0) + self.seconds)


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
