"""High availability: two `llmops run --peering` replicas, as the chart runs them with leaderElection.enabled.

Wanted: exactly one replica reconciles while both live (the other is paused by kopf peering); after a kill -9 of
the active one, the other takes over by itself and reconciles new resources; no duplicate children and no
conflicting writes (every child's spec written by the one field manager `llmops`; one RayJob per resource).

The peering CRDs come from the chart (charts/llmops-operator/charts/kopf-peering/crds); if that file is missing
they are created from kopf's documented schema. The operators watch only the test namespace, so the peering
object is a namespaced KopfPeering there (the chart creates one per watched namespace in that mode).
"""

from __future__ import annotations

import json
import time

import pytest

from integration.harness import REPO, phase
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


def test_one_active_replica_and_takeover_after_kill9(plane, cluster, ns, operators, peering_crds, record):
    cluster.custom.create_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", {
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}})
    findings: list[str] = []

    a = operators.start(ns, f"--peering={PEERING}", name="replica-a", env={"POD_ID": "replica-a"})
    cluster.create(finetune("alone"), ns)
    ok, _ = wait_until(lambda: rayjob(cluster, ns, "alone"), timeout=60)
    assert ok, "a single replica with --peering reconciles nothing:\n" + a.log()[-3000:]

    b = operators.start(ns, f"--peering={PEERING}", name="replica-b", env={"POD_ID": "replica-b"})
    ok, _ = wait_until(lambda: {"replica-a", "replica-b"} <= set(peers(cluster, ns)), timeout=60)
    assert ok, f"replica-b never joined the peering: {peers(cluster, ns)}"
    time.sleep(3)  # let both react to each other's keep-alive
    before = {"replica-a": reconciles(a), "replica-b": reconciles(b)}
    writes_before = {"replica-a": writes(a), "replica-b": writes(b)}
    cluster.create(finetune("both-alive"), ns)
    served, _ = wait_until(lambda: rayjob(cluster, ns, "both-alive"), timeout=30)
    after = {"replica-a": reconciles(a), "replica-b": reconciles(b)}
    writers = {name: writes(op) - writes_before[name] for name, op in (("replica-a", a), ("replica-b", b))}
    active = [name for name in before if after[name] > before[name]]
    if not served or len(active) != 1:
        pausing = [line for line in (a.log() + b.log()).splitlines() if "Pausing" in line or "conflicting" in line]
        findings.append(f"with both replicas alive, {len(active)} reconciled (want exactly 1; "
                        f"RayJob for a new resource: {'yes' if served else 'NO'}); kopf says:\n    "
                        + "\n    ".join(pausing[:6]))

    victim, survivor = (a, b) if active in ([], ["replica-a"]) else (b, a)
    victim_name = "replica-a" if victim is a else "replica-b"
    victim.kill()
    killed_at = time.monotonic()
    cluster.create(finetune("after-kill"), ns)
    took_over, _ = wait_until(lambda: rayjob(cluster, ns, "after-kill") and rayjob(cluster, ns, "both-alive"),
                              timeout=TAKEOVER_TIMEOUT)
    takeover_seconds = round(time.monotonic() - killed_at)
    if not took_over:
        findings.append(f"after kill -9 of {victim_name}, the survivor reconciled nothing in {TAKEOVER_TIMEOUT}s")
    else:
        wait_until(lambda: phase(cluster.get("FineTune", ns, "after-kill")) in ("Running", "Pending"), timeout=60)

    inv = inventory(cluster, ns)
    dup, orph = duplicates(inv), orphans(inv)
    conflicting = {k: v for k, v in appliers(inv).items() if v != {"llmops"}}
    if sum(1 for w in writers.values() if w) > 1:
        findings.append(f"both replicas wrote while both were alive: {writers}")
    errors = unhandled_errors(operators.logs())
    record(replicas=2, active_while_both_alive=len(active), kills_survived=1 if took_over else 0,
           takeover_seconds=takeover_seconds if took_over else None, duplicates=len(dup), orphans=len(orph),
           writes_while_both_alive=writers, conflicting_appliers=len(conflicting), peering_crds=peering_crds)
    assert not dup, dup
    assert not orph, orph
    assert not conflicting, conflicting
    assert not errors, errors[:10]
    assert not findings, "high availability does not hold:\n" + "\n".join(findings)

