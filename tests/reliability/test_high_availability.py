"""High availability: two `llmops run --leader-election` replicas, as the chart runs them with leaderElection.enabled.

Wanted: exactly one replica (the holder of the coordination.k8s.io Lease) reconciles while both live, and the
other writes nothing; after a kill -9 of the leader, the other takes over by itself once the Lease has expired
and reconciles new resources; after a graceful stop the leader releases the Lease and the other takes over at its
next look; no duplicate children and no conflicting writes (every child applied by the one field manager
`llmops`; one RayJob per resource). The operators watch only the test namespace and keep their Lease there.
"""

from __future__ import annotations

import time

import pytest

from manifests import finetune
from reliability.control import unhandled_errors
from reliability.support import duplicates, inventory, metric, orphans, wait_until

pytestmark = pytest.mark.integration

LEASE = "llmops"
TAKEOVER_TIMEOUT = 150  # the Lease expires 60 s after the waiting replica last saw it renewed; it looks every 5 s
HANDOVER_TIMEOUT = 30   # a released Lease: the next look of the waiting replica, then its listing


def lease(cluster, ns: str) -> dict:
    obj = cluster.custom.get_namespaced_custom_object("coordination.k8s.io", "v1", ns, "leases", LEASE)
    return obj.get("spec") or {}


def reconciles(op) -> float:
    try:
        return metric(op.metrics(), "llmops_reconciles_total")
    except OSError:
        return 0.0


def rayjob(cluster, ns: str, name: str):
    return cluster.ray("rayjobs", ns, f"{name}-ft")


def writes(op) -> float:
    try:
        return metric(op.metrics(), "llmops_api_requests_total")
    except OSError:
        return 0.0


def appliers(inv) -> dict[str, set[str]]:
    """Per child: the field managers that server-side apply its spec/data (the operator's replicas all apply as
    `llmops`; a second applier would be a conflicting writer). KubeRay's Update of its own finalizer and the
    payload's report (a merge patch of a result ConfigMap's data) are not applies."""
    out = {}
    for kind, obj in inv.all_children():
        managers = {e.get("manager") for e in obj["metadata"].get("managedFields") or []
                    if e.get("operation") == "Apply" and e.get("subresource") != "status"}
        out[f"{kind}/{obj['metadata']['name']}"] = managers
    return out


def start_pair(cluster, ns: str, operators):
    """replica-a alone first (it must lead and reconcile on its own), then replica-b, which must wait."""
    args = (f"--leader-election={LEASE}", f"--leader-election-namespace={ns}")
    a = operators.start(ns, *args, name="replica-a", env={"POD_NAME": "replica-a"})
    cluster.create(finetune("alone"), ns)
    ok, _ = wait_until(lambda: rayjob(cluster, ns, "alone"), timeout=60)
    assert ok, "a single replica with --leader-election reconciles nothing:\n" + a.log()[-3000:]
    assert lease(cluster, ns).get("holderIdentity") == "replica-a"
    b = operators.start(ns, *args, name="replica-b", env={"POD_NAME": "replica-b"})
    ok, _ = wait_until(lambda: "waiting to lead" in b.log(), timeout=60)
    assert ok, "replica-b never said it waits for the Lease:\n" + b.log()[-3000:]
    return a, b


def says(*ops) -> list[str]:
    return [line for op in ops for line in op.log().splitlines()
            if "Lease" in line or "the operator stops" in line][:8]


def with_both_alive(cluster, ns: str, a, b, name: str, timeout: float) -> tuple[bool, list[str], dict[str, float]]:
    """Create a resource while both replicas live: was it served, which replicas reconciled, who wrote what."""
    replicas = {"replica-a": a, "replica-b": b}
    reconciled = {n: reconciles(op) for n, op in replicas.items()}
    written = {n: writes(op) for n, op in replicas.items()}
    cluster.create(finetune(name), ns)
    served, _ = wait_until(lambda: rayjob(cluster, ns, name), timeout=timeout)
    active = [n for n, op in replicas.items() if reconciles(op) > reconciled[n]]
    return bool(served), active, {n: writes(op) - written[n] for n, op in replicas.items()}


def test_one_replica_leads_and_the_other_takes_over_after_kill9(plane, cluster, ns, operators, record):
    """The leader works, the other stands by and writes nothing; kill -9 the leader and the other takes over by
    itself once the Lease expired."""
    a, b = start_pair(cluster, ns, operators)
    served, active, writers = with_both_alive(cluster, ns, a, b, "both-alive", timeout=60)
    assert served and active == ["replica-a"], f"want replica-a alone active; served={served}, active={active}, " \
                                               f"{says(a, b)}"
    assert not writers["replica-b"], f"the waiting replica wrote: {writers}"

    a.kill()
    killed_at = time.monotonic()
    cluster.create(finetune("after-kill"), ns)
    took_over, _ = wait_until(lambda: rayjob(cluster, ns, "after-kill"), timeout=TAKEOVER_TIMEOUT)
    takeover_seconds = round(time.monotonic() - killed_at)
    assert took_over, f"after kill -9 of the leader nothing was reconciled in {TAKEOVER_TIMEOUT}s: {says(b)}"
    ok, _ = wait_until(lambda: (cluster.get("FineTune", ns, "after-kill").get("status") or {}).get(
        "observedGeneration") == 1, timeout=60)
    assert ok, "the survivor created the RayJob but wrote no status"
    spec = lease(cluster, ns)
    assert spec.get("holderIdentity") == "replica-b" and spec.get("leaseTransitions") == 1, spec

    inv = inventory(cluster, ns)
    dup, orph = duplicates(inv), orphans(inv)
    conflicting = {k: v for k, v in appliers(inv).items() if v != {"llmops"}}
    errors = unhandled_errors(operators.logs())
    record(replicas=2, active_while_both_alive=active, writes_while_both_alive=writers, kills_survived=1,
           takeover_seconds=takeover_seconds, resources=len(inv.resources), duplicates=len(dup),
           orphans=len(orph), conflicting_appliers=len(conflicting))
    assert not dup, dup
    assert not orph, orph
    assert not conflicting, conflicting
    assert not errors, errors[:10]


def test_a_graceful_stop_hands_the_lease_over_at_once(plane, cluster, ns, operators, record):
    """The old pod of a rolling update stops with SIGTERM: it releases the Lease, and the waiting replica takes
    over at its next look, long before the Lease would have expired."""
    a, b = start_pair(cluster, ns, operators)
    stopped_at = time.monotonic()
    a.stop()
    assert "released the Lease" in a.log(), says(a)
    cluster.create(finetune("after-stop"), ns)
    ok, _ = wait_until(lambda: rayjob(cluster, ns, "after-stop"), timeout=HANDOVER_TIMEOUT)
    handover_seconds = round(time.monotonic() - stopped_at, 1)
    assert ok, f"replica-b did not take over within {HANDOVER_TIMEOUT}s of a graceful stop: {says(a, b)}"
    spec = lease(cluster, ns)
    assert spec.get("holderIdentity") == "replica-b" and spec.get("leaseTransitions") == 1, spec
    inv = inventory(cluster, ns)
    record(replicas=2, served_after_graceful_stop_seconds=handover_seconds, duplicates=len(duplicates(inv)))
    assert not duplicates(inv)
    assert not unhandled_errors(operators.logs())
