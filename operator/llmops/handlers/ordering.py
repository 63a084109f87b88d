"""The order a set of children is written in, and the marker that says the whole set was written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..builders.common import LABEL_PREFIX, RESULT_ROLE, ROLE_LABEL, is_shared

HASH_ANNOTATION = f"{LABEL_PREFIX}/children-hash"   # on the marker: the hash of the whole set
BUILT_ANNOTATION = f"{LABEL_PREFIX}/built-from"      # ... and what the set was built from (a restart reads it)
GUARDS = ("SecurityPolicy",)   # written before what they protect: an exposed route is never open without its policy


def _is_result(child: dict[str, Any]) -> bool:
    return child["metadata"].get("labels", {}).get(ROLE_LABEL) == RESULT_ROLE


def identity(children: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The children as their hashes see them: a shared child is named by its content, so its name stands for it
    (hashing its data, every payload's source, took a sixth of the operator's time in a burst)."""
    return [{"shared": c["metadata"]["name"]} if is_shared(c) else c for c in children]


def holds(children: list[dict[str, Any]], kind: str) -> bool:
    return any(c["kind"] == kind for c in children)


def stateful(child: dict[str, Any], ray_kind: str) -> bool:
    """A child whose state a new owner would inherit: the Ray object and the result report."""
    return child["kind"] == ray_kind or _is_result(child)


def apply_rounds(children: list[dict[str, Any]], ray_kind: str) -> list[list[dict[str, Any]]]:
    """The order children are applied in, as rounds of concurrent applies. The Ray object goes first, with the
    ServiceAccount its pods are created under, so the work starts as early as it can; what the pods read later
    (ConfigMaps; the Role and RoleBinding they report through) follows, the RoleBinding after its Role (RBAC
    checks a binding against the Role, which must exist by then). An API-key policy precedes the route it guards.
    The marker goes last, alone: the child that
    carries the hash of the whole set (a job's result report; for a service, its only child, the Ray object).
    Its hash says every child was written, so a crash part-way leaves the set to be applied again."""
    marker = next((c for c in children if _is_result(c)), None)
    ray = [c for c in children if c["kind"] == ray_kind]
    if marker is None:
        marker = ray[0] if ray else children[-1]
    first = [c for c in children if c is not marker and (c["kind"] == ray_kind or c["kind"] == "ServiceAccount")]
    if not holds(first, ray_kind):
        first = []   # the Ray object is the marker: everything else before it
    bindings = [c for c in children if c["kind"] == "RoleBinding" and c is not marker]
    guards = [c for c in children if c["kind"] in GUARDS and c is not marker]
    others = [c for c in children if c is not marker and not any(c is x for x in first + guards + bindings)]
    return [r for r in (first, guards, others, bindings, [marker]) if r]


@dataclass
class Plan:
    """One application of a changed set of children."""

    uid: str
    wanted: str                        # the set's hash, written on the marker
    rounds: list[list[dict[str, Any]]]
    created: bool                      # the Ray object is created by this application
    ray_kind: str
    fresh: dict[str, Any] | None = None   # the Ray object as created, until the watch shows it
