"""Operator core on the real plane: metrics, zero writes at rest, restarts without rewrites."""

from __future__ import annotations

import re

import pytest

from integration.harness import OperatorProcess, condition, phase, wait_for
from manifests import batchinference, finetune
from reliability.support import eventually_quiet

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


def test_restart_converges_without_rewriting(plane, cluster, ns, tmp_path, alone):
    """With the shared operator paused: otherwise it would do the writes the restarted one must not need."""
    def versions() -> dict[str, str]:
        return {k: cluster.get(k, ns, n)["metadata"]["resourceVersion"]
                for k, n in (("FineTune", "steady"), ("BatchInference", "waiting"))}

    first = OperatorProcess(plane, tmp_path / "first.log", args=("-n", ns)).start()
    try:
        cluster.create(finetune("steady"), ns)
        cluster.create(batchinference("waiting", fine_tune="missing"), ns)
        wait_for(lambda: phase(cluster.get("FineTune", ns, "steady")) == "Running", timeout=90, what="Running")
        wait_for(lambda: (cluster.get("BatchInference", ns, "waiting").get("status") or {}).get("phase"),
                 what="the BatchInference status")
        # settled: the first operator's last status writes are in, nothing moves for a second
        quiet, moved = eventually_quiet(lambda: {**versions(), "writes": _counter(first.metrics(),
                                                                                 "llmops_api_requests_total")},
                                        seconds=1.0, timeout=30)
        assert quiet, f"the first operator never settled: {moved}"
        settled = versions()
    finally:
        first.kill()
    second = OperatorProcess(plane, tmp_path / "second.log", args=("-n", ns)).start()
    try:
        def reconciled_both() -> str | None:  # counted once the reconcile's writes, if any, are done
            text = second.metrics()
            return text if all(_counter(text, "llmops_reconciles_total", kind=k) >= 1
                               for k in ("FineTune", "BatchInference")) else None

        text = wait_for(reconciled_both, timeout=30, what="the restarted operator to reconcile both resources")
        # A reconcile that finds nothing to change sends nothing: no applies, no status writes.
        assert _counter(text, "llmops_api_requests_total", verb="PATCH") == 0, text
        assert _counter(text, "llmops_api_requests_total", verb="POST") == 0, text
        assert versions() == settled
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
    # Another reconcile of the failed FineTune (an annotation is a change) must not bring the RayJob back either.
    done = _counter(operator.metrics(), "llmops_reconciles_total", kind="FineTune")
    cluster.patch("FineTune", ns, "orphaned", {"metadata": {"annotations": {"touched": "1"}}})
    wait_for(lambda: _counter(operator.metrics(), "llmops_reconciles_total", kind="FineTune") > done,
             timeout=30, what="a reconcile of the touched FineTune")
    assert cluster.ray("rayjobs", ns, "orphaned-ft") is None
    assert phase(cluster.get("FineTune", ns, "orphaned")) == "Failed"
