"""What every kind's decide reads (the observation's common part) and returns (what the engine applies)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..api.common import StatusBase
from ..builders.common import Owner
from ..status import PodProblem, Verdict


@dataclass(frozen=True)
class CacheSeen:
    """A model cache's download as observed: its Job (status only), its report, its pod's problems."""

    job: Mapping[str, Any] | None = None
    report: Mapping[str, str] | None = None
    problems: tuple[PodProblem, ...] = ()


@dataclass(frozen=True)
class Observation:
    """What every kind's reconcile reads, as handlers/observe.py found it; each kind's observation adds its own."""

    owner: Owner
    status: StatusBase               # as the resource shows it, or as this process wrote it last (its kind's)
    spec: Any = None                 # the validated spec; None when it is invalid
    spec_error: str = ""             # ... and then, what is wrong with it, each field named
    now: float = 0.0                 # time.time() when observed
    cache: CacheSeen = CacheSeen()   # the model cache's download (read only when the spec asks for a cache)


@dataclass
class Outcome:
    """What a kind's reconcile decided: children to have, and where the resource stands."""

    children: list[dict[str, Any]]   # empty: nothing to have, or (with memo_key) already applied as they are
    verdict: Verdict
    ray_kind: str = "RayJob"
    memo_key: str | None = None   # what the children were built from (`built_from`; None: not memoized)
    delete: list[tuple[str, str, str]] = field(default_factory=list)  # (apiVersion, kind, name) to remove; the
    # Ray object only once the watch shows it, anything else at once (a missing one is no error)
    requeue_after: float | None = None   # look again after this many seconds even if nothing changes
    confirm_absent: tuple[str, str, str] | None = None   # (apiVersion, kind, name): the verdict holds only if
    # the API server has no such child of this owner either (the watch may lag behind it)
    queued: str | None = None   # the uid of a RayJob waiting in a Kueue queue: read its Workload, decide again
    check_cluster: str | None = None   # a RayCluster short of pods: read its ReplicaFailure condition, decide again


def invalid_spec(error: str, ray_kind: str = "RayJob") -> Outcome:
    """Every way a spec can be wrong ends as Stalled, never as a retry."""
    return Outcome([], Verdict("Failed", "stalled", "InvalidSpec", error), ray_kind=ray_kind)
