"""What the reliability tests check, as plain functions over the API server's objects.

* `inventory`: our resources and every object the operator made for them (by label), in one namespace.
* `duplicates` / `orphans`: more than one Ray object per owner uid; a child whose controller owner is gone.
* `settled`: where a resource's status may rest (the definition docs/reliability.md explains).
* `metric`: one series of the operator's /metrics.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from kubernetes.client.rest import ApiException

from integration.harness import GROUP, PLURALS, VERSION, Cluster, condition

MANAGED = "app.kubernetes.io/managed-by=llmops"
KINDS = tuple(PLURALS)
RAY_KIND = {"FineTune": "RayJob", "BatchInference": "RayJob", "LLMService": "RayService"}
# The one Reconciling=True reason that is the operator's own transient: it has not yet seen the child it applied.
# Every other Reconciling reason waits on something outside the operator (KubeRay, the scheduler, the Ray job,
# another resource) and is a place a status may rest.
IN_FLIGHT_REASONS = {"Creating"}


@dataclass
class Inventory:
    resources: list[dict[str, Any]] = field(default_factory=list)            # FineTune/BatchInference/LLMService
    children: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # kind -> objects labelled llmops

    def by_uid(self) -> dict[str, dict[str, Any]]:
        return {r["metadata"]["uid"]: r for r in self.resources}

    def all_children(self) -> list[tuple[str, dict[str, Any]]]:
        return [(kind, obj) for kind, objs in self.children.items() for obj in objs]


def _plain(obj: Any, api_client) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else api_client.sanitize_for_serialization(obj)


def inventory(cluster: Cluster, ns: str) -> Inventory:
    inv = Inventory()
    for kind, plural in PLURALS.items():
        inv.resources += cluster.custom.list_namespaced_custom_object(GROUP, VERSION, ns, plural)["items"]
    for kind, plural in (("RayJob", "rayjobs"), ("RayService", "rayservices")):
        inv.children[kind] = cluster.custom.list_namespaced_custom_object("ray.io", "v1", ns, plural,
                                                                          label_selector=MANAGED)["items"]
    a = cluster.api_client
    inv.children["ConfigMap"] = [_plain(o, a) for o in cluster.core.list_namespaced_config_map(
        ns, label_selector=MANAGED).items]
    inv.children["ServiceAccount"] = [_plain(o, a) for o in cluster.core.list_namespaced_service_account(
        ns, label_selector=MANAGED).items]
    inv.children["Role"] = [_plain(o, a) for o in cluster.rbac.list_namespaced_role(ns, label_selector=MANAGED).items]
    inv.children["RoleBinding"] = [_plain(o, a) for o in cluster.rbac.list_namespaced_role_binding(
        ns, label_selector=MANAGED).items]
    return inv


def controller(obj: dict[str, Any]) -> dict[str, Any] | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def ray_children(inv: Inventory) -> dict[str, list[dict[str, Any]]]:
    """Owner uid -> its RayJobs/RayServices."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for kind in ("RayJob", "RayService"):
        for obj in inv.children[kind]:
            ref = controller(obj)
            out[ref["uid"] if ref else "<none>"].append(obj)
    return out


def duplicates(inv: Inventory) -> list[str]:
    """Resources with more than one Ray object, as 'Kind/name: a, b'."""
    owners = inv.by_uid()
    found = []
    for uid, objs in ray_children(inv).items():
        if len(objs) > 1:
            owner = owners.get(uid, {"kind": "?", "metadata": {"name": uid}})
            found.append(f"{owner['kind']}/{owner['metadata']['name']}: "
                         + ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objs))
    return found


def orphans(inv: Inventory) -> list[str]:
    """Children whose controller owner does not exist (by uid, kind and name)."""
    owners = inv.by_uid()
    found = []
    for kind, obj in inv.all_children():
        if (obj["metadata"].get("labels") or {}).get("llmops.dev/role") == "payloads":
            continue  # the payload sources: shared by the namespace's jobs, owned by none of them
        ref = controller(obj)
        owner = owners.get(ref["uid"]) if ref else None
        if owner is None or owner["kind"] != ref["kind"] or owner["metadata"]["name"] != ref["name"] \
                or owner["metadata"].get("deletionTimestamp"):
            found.append(f"{kind}/{obj['metadata']['name']} (owner {ref and ref['kind']}/{ref and ref['name']} "
                         f"uid {ref and ref['uid']})")
    return found


def missing_ray_child(inv: Inventory) -> list[str]:
    """Resources whose status says a Ray object exists (Running, Succeeded, Ready...) but none does."""
    children = ray_children(inv)
    found = []
    for r in inv.resources:
        phase = (r.get("status") or {}).get("phase")
        needs = phase in ("Running", "Succeeded", "Ready", "Upgrading") or (
            r["kind"] == "LLMService" and phase not in (None, "Suspended", "Failed"))
        if needs and not children.get(r["metadata"]["uid"]):
            found.append(f"{r['kind']}/{r['metadata']['name']} is {phase} without its {RAY_KIND[r['kind']]}")
    return found


def unconverged(inv: Inventory) -> list[str]:
    found = []
    for r in inv.resources:
        status = r.get("status") or {}
        if status.get("observedGeneration") != r["metadata"].get("generation"):
            found.append(f"{r['kind']}/{r['metadata']['name']}: observedGeneration {status.get('observedGeneration')}"
                         f" != generation {r['metadata'].get('generation')}")
        for type_ in condition_types(r):
            c = condition(r, type_)
            if c.get("observedGeneration") != r["metadata"].get("generation"):
                found.append(f"{r['kind']}/{r['metadata']['name']}: condition {type_} is stale or missing ({c})")
    return found


def condition_types(obj: dict[str, Any]) -> tuple[str, ...]:
    """The conditions the operator writes: Ready, Reconciling, Stalled; Suspended in place of Ready while
    suspended."""
    first = "Suspended" if condition(obj, "Suspended") else "Ready"
    return (first, "Reconciling", "Stalled")


def settled(obj: dict[str, Any] | None) -> str | None:
    """Where the resource rests, or None while it is still in flight.

    A status rests when it describes the current generation and says one of: Ready=True; Stalled=True (the
    operator gave up and says why); Suspended=True (with reason Suspended); or Reconciling=True with a reason that
    waits on something outside the operator (any reason but IN_FLIGHT_REASONS: the Ray cluster, the job, a
    FineTune, a node that fits).
    """
    if not obj:
        return None
    status = obj.get("status") or {}
    generation = obj["metadata"].get("generation")
    if status.get("observedGeneration") != generation:
        return None
    conds = {t: condition(obj, t) for t in condition_types(obj)}
    if any(c.get("observedGeneration") != generation for c in conds.values()):
        return None
    true = [t for t, c in conds.items() if c.get("status") == "True"]
    if len(true) != 1:
        return None
    if true[0] == "Suspended":
        return "Suspended" if status.get("phase") == "Suspended" and conds["Suspended"].get("reason") == "Suspended" \
            else None
    c = conds[true[0]]
    if not c.get("reason") or not c.get("message"):
        return None
    if true[0] == "Reconciling" and c["reason"] in IN_FLIGHT_REASONS:
        return None
    return f"{true[0]}:{c['reason']}"


_SERIES = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the series `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = _SERIES.match(line.strip())
        if not m or m.group("name") != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels") or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group("value"))
    return total


def resource_versions(inv: Inventory) -> dict[str, str]:
    return {f"{r['kind']}/{r['metadata']['name']}": r["metadata"]["resourceVersion"] for r in inv.resources}


def child_generations(inv: Inventory) -> dict[str, Any]:
    """What the operator writes of its children (spec: generation; ConfigMaps/RBAC have none: resourceVersion)."""
    out = {}
    for kind, obj in inv.all_children():
        meta = obj["metadata"]
        if kind == "ConfigMap" and (meta.get("labels") or {}).get("llmops.dev/role") == "result":
            continue  # the payload (simulator) writes these, not the operator
        out[f"{kind}/{meta['name']}"] = meta.get("generation") or meta["resourceVersion"]
    return out


def eventually_quiet(observe: Callable[[], dict[str, Any]], seconds: float, timeout: float
                     ) -> tuple[bool, dict[str, tuple[Any, Any]]]:
    """Wait for a window of `seconds` in which nothing `observe()` returns changes (resourceVersions, write
    counters). A late legitimate change only delays the window; a write loop never lets it come. Returns whether
    a quiet window came, and what changed in the last one."""
    deadline = time.monotonic() + timeout
    while True:
        before = observe()
        time.sleep(seconds)
        after = observe()
        changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
        if not changed or time.monotonic() > deadline:
            return not changed, changed


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 1.0) -> tuple[bool, Any]:
    """Poll `check` until it returns something falsy-free; (True, value) or (False, last value)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return True, last
        if time.monotonic() > deadline:
            return False, last
        time.sleep(interval)


def get_or_none(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
