"""Operator core on the real plane: metrics, zero writes at rest, restarts without rewrites."""

from __future__ import annotations

import re
import time

import pytest

from integration.harness import OperatorProcess, condition, phase, wait_for
from manifests import batchinference, finetune

pytestmark = pytest.mark.integration


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_endpoint(cluster, operator, ns):
    cluster.create(finetune("metered"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "metered")) == "Running", timeout=90, what="Running")
    text = operator.metrics()
    for name in ("llmops_reconciles_total", "llmops_reconcile_duration_seconds_bucket", "llmops_resources",
                 "llmops_api_requests_total"):
        assert name in text, name
    assert _counter(text, "llmops_reconciles_total", kind="FineTune", result="ok") >= 1
    assert re.search(r'llmops_resources\{kind="FineTune",phase="Running"\} [1-9]', text)


def test_restart_converges_without_rewriting(plane, cluster, ns, tmp_path):
    first = OperatorProcess(plane, tmp_path / "first.log", args=("-n", ns)).start()
    try:
        cluster.create(finetune("steady"), ns)
        cluster.create(batchinference("waiting", fine_tune="missing"), ns)
        wait_for(lambda: phase(cluster.get("FineTune", ns, "steady")) == "Running", timeout=90, what="Running")
        wait_for(lambda: (cluster.get("BatchInference", ns, "waiting").get("status") or {}).get("phase"),
                 what="the BatchInference status")
        time.sleep(2)
        settled = {k: cluster.get(k, ns, n)["metadata"]["resourceVersion"]
                   for k, n in (("FineTune", "steady"), ("BatchInference", "waiting"))}
    finally:
        first.kill()
    second = OperatorProcess(plane, tmp_path / "second.log", args=("-n", ns)).start()
    try:
        time.sleep(5)   # long enough for the restarted operator to reconcile everything it lists
        text = second.metrics()
        assert _counter(text, "llmops_reconciles_total") >= 2, text
        # A reconcile that finds nothing to change sends nothing: no applies, no status writes.
        assert _counter(text, "llmops_api_requests_total", verb="PATCH") == 0, text
        assert _counter(text, "llmops_api_requests_total", verb="POST") == 0, text
        now = {k: cluster.get(k, ns, n)["metadata"]["resourceVersion"]
               for k, n in (("FineTune", "steady"), ("BatchInference", "waiting"))}
        assert now == settled
        assert len(cluster.ray_list("rayjobs", ns)) == 1
    finally:
        second.stop()


def test_rayjob_deleted_while_the_operator_is_down(cluster, operator, ns):
    """The restarted operator lists no RayJob for a FineTune that had one: the run failed (RayJobDeleted), and
    nothing re-creates the RayJob."""
    cluster.create(finetune("orphaned"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "orphaned")) == "Running", timeout=90, what="Running")
    operator.kill()
    try:
        cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", "orphaned-ft")
        wait_for(lambda: cluster.ray("rayjobs", ns, "orphaned-ft") is None, timeout=60, what="the RayJob to go")
        assert phase(cluster.get("FineTune", ns, "orphaned")) == "Running"
    finally:
        operator.start()
    ft = wait_for(lambda: (lambda o: o if phase(o) == "Failed" else None)(cluster.get("FineTune", ns, "orphaned")),
                  timeout=60, what="Failed")
    assert condition(ft, "Stalled")["reason"] == "RayJobDeleted"
    time.sleep(3)
    assert cluster.ray("rayjobs", ns, "orphaned-ft") is None
