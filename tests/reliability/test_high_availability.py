"""High availability: two `llmops run --peering` replicas, as the chart runs them with leaderElection.enabled.

Wanted, with distinct priorities (`--priority`): exactly one replica reconciles while both live (the other is
paused by kopf peering and writes nothing); after a kill -9 of the active one, the other takes over by itself
and reconciles new resources; no duplicate children and no conflicting writes (every child applied by the one
field manager `llmops`; one RayJob per resource). With equal priorities kopf pauses both: nothing is written
twice, and the survivor of a graceful stop resumes at once.

The peering CRDs come from the chart (charts/llmops-operator/charts/kopf-peering/crds); if that file is missing
they are created from kopf's documented schema. The operators watch only the test namespace, so the peering
object is a namespaced KopfPeering there (the chart creates one per watched namespace in that mode).
"""

from __future__ import annotations

import json
import time

import pytest

from integration.harness import REPO
from manifests import finetune
from reliability.control import unhandled_errors
from reliability.support import duplicates, inventory, metric, orphans, wait_until

pytestmark = pytest.mark.integration

CHART_PEERING_CRDS = REPO / "charts" / "llmops-operator" / "charts" / "kopf-peering" / "crds" / "kopf.dev_peerings.yaml"
PEERING = "llmops"
TAKEOVER_TIMEOUT = 150  # kopf forgets a peer that stopped without saying goodbye after its lifetime (60 s)


def documented_peering_crds() -> list[dict]:
    """kopf's peering CRDs as its documentation gives them (group kopf.dev, v1, status keeps unknown fields)."""
    out = []
    for scope, kind, plural in (("Cluster", "ClusterKopfPeering", "clusterkopfpeerings"),
                                ("Namespaced", "KopfPeering", "kopfpeerings")):
        out.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev"},
            "spec": {"scope": scope, "group": "kopf.dev",
                     "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
        })
    return out


@pytest.fixture(scope="module")
def peering_crds(plane):
    if CHART_PEERING_CRDS.exists():
        plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART_PEERING_CRDS), quiet=True)
        source = str(CHART_PEERING_CRDS.relative_to(REPO))
    else:
        plane.kubectl("apply", "--server-side", "-f", "-", quiet=True,
                      input=json.dumps({"apiVersion": "v1", "kind": "List", "items": documented_peering_crds()}))
        source = "kopf's documented schema"
    plane.wait_crds_established(["kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"])
    return source


def peers(cluster, ns: str) -> dict:
    obj = cluster.custom.get_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", PEERING)
    return obj.get("status") or {}


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


def start_pair(cluster, ns: str, operators, priorities: tuple[int, int]):
    """replica-a alone first (it must reconcile on its own), then replica-b joins the peering."""
    cluster.custom.create_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}})
    a = operators.start(ns, f"--peering={PEERING}", f"--priority={priorities[0]}", name="replica-a",
                        env={"POD_ID": "replica-a"})
    cluster.create(finetune("alone"), ns)
    ok, _ = wait_until(lambda: rayjob(cluster, ns, "alone"), timeout=60)
    assert ok, "a single replica with --peering reconciles nothing:\n" + a.log()[-3000:]
    b = operators.start(ns, f"--peering={PEERING}", f"--priority={priorities[1]}", name="replica-b",
                        env={"POD_ID": "replica-b"})
    ok, _ = wait_until(lambda: {"replica-a", "replica-b"} <= set(peers(cluster, ns)), timeout=60)
    assert ok, f"replica-b never joined the peering: {peers(cluster, ns)}"
    # once each has seen the other: the lower priority paused, the higher active; equal priorities both paused
    wanted = ["paused" if p == min(priorities) else "active" for p in priorities]
    ok, _ = wait_until(lambda: [peering_state(a), peering_state(b)] == wanted, timeout=60)
    assert ok, f"want replica-a, replica-b {wanted}, have {[peering_state(a), peering_state(b)]}: {kopf_says(a, b)}"
    return a, b


def peering_state(op) -> str:
    """'paused' or 'active' as kopf's log tells it ('' before any verdict): a replica with mandatory peering starts
    paused and logs each resume and pause; a conflict with an equal peer keeps it paused."""
    state = ""
    for line in op.log().splitlines():
        if "Resuming operations" in line:
            state = "active"
        elif "Pausing" in line or "Possibly conflicting operators" in line:
            state = "paused"
    return state


def with_both_alive(cluster, ns: str, a, b, name: str, timeout: float) -> tuple[bool, list[str], dict[str, float]]:
    """Create a resource while both replicas live: was it served, which replicas reconciled, who wrote what."""
    replicas = {"replica-a": a, "replica-b": b}
    reconciled = {n: reconciles(op) for n, op in replicas.items()}
    written = {n: writes(op) for n, op in replicas.items()}
    cluster.create(finetune(name), ns)
    served, _ = wait_until(lambda: rayjob(cluster, ns, name), timeout=timeout)
    active = [n for n, op in replicas.items() if reconciles(op) > reconciled[n]]
    return bool(served), active, {n: writes(op) - written[n] for n, op in replicas.items()}


def kopf_says(*ops) -> list[str]:
    return [line for op in ops for line in op.log().splitlines()
            if "Pausing" in line or "Resuming" in line or "conflicting" in line][:8]


def test_replicas_with_distinct_priorities_fail_over_after_kill9(plane, cluster, ns, operators, peering_crds,
                                                                 record):
    """The HA setup (`--priority`): the higher-priority replica works, the other stands by and writes nothing;
    kill -9 the active one and the other takes over by itself."""
    a, b = start_pair(cluster, ns, operators, (5, 10))
    served, active, writers = with_both_alive(cluster, ns, a, b, "both-alive", timeout=60)
    assert served and active == ["replica-b"], (
        f"want replica-b (priority 10) alone active; served={served}, active={active}, kopf says: {kopf_says(a, b)}")
    assert not writers["replica-a"], f"the standby replica wrote: {writers}"

    b.kill()
    killed_at = time.monotonic()
    cluster.create(finetune("after-kill"), ns)
    took_over, _ = wait_until(lambda: rayjob(cluster, ns, "after-kill"), timeout=TAKEOVER_TIMEOUT)
    takeover_seconds = round(time.monotonic() - killed_at)
    assert took_over, f"after kill -9 of the active replica nothing was reconciled in {TAKEOVER_TIMEOUT}s: " \
                      f"{kopf_says(a)}"
    ok, _ = wait_until(lambda: (cluster.get("FineTune", ns, "after-kill").get("status") or {}).get(
        "observedGeneration") == 1, timeout=60)
    assert ok, "the survivor created the RayJob but wrote no status"

    inv = inventory(cluster, ns)
    dup, orph = duplicates(inv), orphans(inv)
    conflicting = {k: v for k, v in appliers(inv).items() if v != {"llmops"}}
    errors = unhandled_errors(operators.logs())
    record(replicas=2, priorities="5/10", active_while_both_alive=active, writes_while_both_alive=writers,
           kills_survived=1, takeover_seconds=takeover_seconds, resources=len(inv.resources), duplicates=len(dup),
           orphans=len(orph), conflicting_appliers=len(conflicting), peering_crds=peering_crds)
    assert not dup, dup
    assert not orph, orph
    assert not conflicting, conflicting
    assert not errors, errors[:10]


def test_replicas_with_equal_priorities_never_both_write(plane, cluster, ns, operators, peering_crds, record):
    """Two replicas with the same priority (the chart's replicas > 1, or a rolling update's surge pod): kopf
    pauses both rather than let both write. Nothing is written twice; once one of them stops (gracefully, as the
    old pod of a rolling update does: it takes itself out of the peering), the other resumes at once."""
    a, b = start_pair(cluster, ns, operators, (0, 0))
    served, active, writers = with_both_alive(cluster, ns, a, b, "both-alive", timeout=15)
    assert len(active) <= 1 and sum(1 for w in writers.values() if w) <= 1, \
        f"both replicas worked at once: active={active}, writes={writers}"
    stopped_at = time.monotonic()
    b.stop()  # SIGTERM: kopf takes the replica out of the peering on its way out
    ok, _ = wait_until(lambda: rayjob(cluster, ns, "both-alive"), timeout=60)
    resumed_seconds = round(time.monotonic() - stopped_at, 1)
    assert ok, f"replica-a did not resume after replica-b stopped: {kopf_says(a)}"
    inv = inventory(cluster, ns)
    record(replicas=2, priorities="0/0", active_while_both_alive=active, served_while_both_alive=served,
           writes_while_both_alive=writers, served_after_graceful_stop_began_seconds=resumed_seconds,
           duplicates=len(duplicates(inv)), kopf_says=kopf_says(a, b)[:2])
    assert not duplicates(inv)
    assert not unhandled_errors(operators.logs())
