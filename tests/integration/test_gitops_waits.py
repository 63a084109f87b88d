"""Waiting on our resources as GitOps tools do, on the real plane: kstatus (Flux's health checks: done at Current,
failed at Failed, through tools/gitops-health on `kubectl get --watch`) and `kubectl wait`."""

from __future__ import annotations

import time

import pytest

from integration.harness import ClientWait, condition, phase, wait_for
from llmops.dev.simulator import Simulator
from manifests import batchinference, finetune

pytestmark = pytest.mark.integration


@pytest.fixture()
def simulator(plane, ns):
    return Simulator(plane.kubeconfig, run_seconds=0, namespace=ns)


def _until_done(simulator, *waits: ClientWait, timeout: float = 120) -> None:
    """Play the Ray jobs' part until every wait has ended."""
    deadline = time.monotonic() + timeout
    while not all(w.done() for w in waits):
        assert time.monotonic() < deadline, "the waits did not end"
        simulator.step()
        time.sleep(0.3)


def test_new_resource_reads_unobserved_until_the_operator_writes(cluster, ns):
    """The API server defaults status.observedGeneration to 0: right after an apply, before the operator has written
    anything, kstatus reads InProgress (an empty status would be Current) and Argo CD Progressing."""
    created = cluster.create(finetune("fresh"), ns)
    assert created["status"] == {"observedGeneration": 0}
    assert created["metadata"]["generation"] == 1


def test_finetune_suspended_resumed_succeeded(plane, cluster, operator, ns, simulator):
    doc = finetune("paused")
    doc["spec"]["suspend"] = True
    cluster.create(doc, ns)
    waits = [ClientWait(plane, "FineTune", ns, "paused", timeout=60),
             ClientWait(plane, "FineTune", ns, "paused", timeout=60, kubectl_wait="condition=Suspended")]
    codes = [w.result(timeout=70) for w in waits]
    # Suspended is where the spec puts it: kstatus reads Current (a Flux health check passes), not InProgress.
    assert codes[0][0] == 0 and codes[0][1].rstrip().endswith("Current: Resource is current"), codes[0][1]
    assert codes[1][0] == 0, codes[1][1]
    assert phase(cluster.get("FineTune", ns, "paused")) == "Suspended"
    # Ready=True means the job succeeded: waiting for it does not end on a suspension.
    not_ready = ClientWait(plane, "FineTune", ns, "paused", timeout=3, kubectl_wait="condition=Ready").result(10)
    assert not_ready[0] != 0, not_ready

    cluster.patch("FineTune", ns, "paused", {"spec": {"suspend": False}})
    waits = [ClientWait(plane, "FineTune", ns, "paused", timeout=120),
             ClientWait(plane, "FineTune", ns, "paused", timeout=120, kubectl_wait="condition=Ready")]
    try:
        _until_done(simulator, *waits)
        (code, seen), (ready_code, ready_out) = (w.result() for w in waits)
    finally:
        for w in waits:
            w.stop()
    assert code == 0 and ready_code == 0, (seen, ready_out)
    lines = seen.splitlines()
    assert "InProgress" in lines[0] and lines[-1].endswith("Current: Resource is Ready"), seen
    ft = cluster.get("FineTune", ns, "paused")
    assert phase(ft) == "Succeeded" and not condition(ft, "Suspended")


def test_batchinference_applied_before_its_finetune(plane, cluster, operator, ns, simulator):
    """`kubectl apply -f examples/viggo/` order: the BatchInference first. A Flux health check must wait through
    FineTuneNotFound (Reconciling), not fail on it, and end when the evaluation has succeeded."""
    cluster.create(batchinference("early", fine_tune="later"), ns)
    waits = [ClientWait(plane, "BatchInference", ns, "early", timeout=150),
             ClientWait(plane, "BatchInference", ns, "early", timeout=150, kubectl_wait="condition=Ready")]
    try:
        bi = wait_for(lambda: (lambda o: o if condition(o, "Reconciling").get("reason") == "FineTuneNotFound"
                               else None)(cluster.get("BatchInference", ns, "early")), what="FineTuneNotFound")
        assert condition(bi, "Stalled")["status"] == "False"
        time.sleep(1)
        assert not any(w.done() for w in waits), [w.result() for w in waits if w.done()]
        cluster.create(finetune("later"), ns)
        _until_done(simulator, *waits, timeout=150)
        (code, seen), (ready_code, ready_out) = (w.result() for w in waits)
    finally:
        for w in waits:
            w.stop()
    assert code == 0 and ready_code == 0, (seen, ready_out)
    assert any(": InProgress: FineTune later (spec.model.fineTuneRef) does not exist" in line
               for line in seen.splitlines()), seen
    assert not any(": Failed:" in line for line in seen.splitlines()), seen
    assert phase(cluster.get("BatchInference", ns, "early")) == "Succeeded"
    assert phase(cluster.get("FineTune", ns, "later")) == "Succeeded"
