"""BatchInference on the real plane: the FineTune -> BatchInference chain, metrics in status, failures."""

from __future__ import annotations

import json
import re
import time

import pytest

from integration.harness import condition, phase, wait_for
from llmops.dev.simulator import Plan, Simulator
from manifests import batchinference, finetune

pytestmark = pytest.mark.integration


@pytest.fixture()
def simulator(plane, ns):
    return Simulator(plane.kubeconfig, run_seconds=0, namespace=ns)


def _finish(simulator, cluster, ns, kind, name, job, plan=None):
    if plan:
        simulator.plans[(ns, job)] = plan
    wait_for(lambda: (simulator.step() or True) and phase(cluster.get(kind, ns, name)) in ("Succeeded", "Failed"),
             timeout=90, what=f"{kind} {name} to finish")


def test_chain_waits_for_finetune_then_runs_with_its_adapter(plane, cluster, operator, ns, simulator):
    cluster.create(finetune("tune"), ns)
    cluster.create(batchinference("eval", fine_tune="tune"), ns)
    bi = wait_for(lambda: (lambda o: o if condition(o, "Reconciling").get("reason") == "WaitingForFineTune" else None)(
        cluster.get("BatchInference", ns, "eval")), what="WaitingForFineTune")
    assert phase(bi) == "Waiting" and "FineTune tune" in condition(bi, "Reconciling")["message"]
    assert cluster.ray("rayjobs", ns, "eval-bi") is None

    wait_for(lambda: phase(cluster.get("FineTune", ns, "tune")) == "Running", timeout=90, what="FineTune Running")
    _finish(simulator, cluster, ns, "FineTune", "tune", "tune-ft")
    job = wait_for(lambda: cluster.ray("rayjobs", ns, "eval-bi"), timeout=60, what="the BatchInference RayJob")
    assert job["spec"]["entrypoint"].startswith("python -m payloads.batch_inference")
    config = json.loads(wait_for(lambda: cluster.config_map(ns, "eval-bi-config"),
                                 what="the job ConfigMap").data["job.json"])
    assert config["model"] == {"source": "Qwen/Qwen2.5-7B-Instruct",
                               "adapter": {"name": "tune", "uri": "s3://bucket/adapters/tune"}}
    assert config["engineKwargs"]["enable_prefix_caching"] is True
    assert config["engineKwargs"]["enable_chunked_prefill"] is True

    wait_for(lambda: phase(cluster.get("BatchInference", ns, "eval")) == "Running", timeout=90, what="Running",
             show=lambda: (cluster.get("BatchInference", ns, "eval") or {}).get("status"))
    _finish(simulator, cluster, ns, "BatchInference", "eval", "eval-bi")
    bi = cluster.get("BatchInference", ns, "eval")
    assert phase(bi) == "Succeeded" and condition(bi, "Ready")["status"] == "True"
    assert bi["status"]["metrics"] == {"rows": 1083, "exactMatch": pytest.approx(0.688), "simulated": True}
    assert bi["status"]["outputURI"] == "s3://bucket/viggo/out-eval"
    assert bi["status"]["adapterURI"] == "s3://bucket/adapters/tune"
    table = plane.kubectl("get", "bi", "-n", ns, quiet=True).stdout
    # The simulated figures appear only with their mark: ROWS, EXACT MATCH, SIMULATED, REASON.
    assert re.search(r"\bSucceeded\s+1083\s+0\.688\s+true\s+Succeeded\b", table), table


def test_missing_finetune_is_a_wait_not_stalled(cluster, operator, ns):
    cluster.create(batchinference("orphan", fine_tune="nope"), ns)
    bi = wait_for(lambda: (lambda o: o if condition(o, "Reconciling").get("reason") == "FineTuneNotFound" else None)(
        cluster.get("BatchInference", ns, "orphan")), what="Reconciling: FineTuneNotFound")
    # Applied a moment before its FineTune (kubectl apply -f <folder>, a GitOps sync): a wait, not Stalled.
    waiting = condition(bi, "Reconciling")
    assert waiting["status"] == "True" and condition(bi, "Stalled")["status"] == "False" and phase(bi) == "Waiting"
    assert "FineTune nope (spec.model.fineTuneRef) does not exist" in waiting["message"]
    assert "then this stalls" in waiting["message"]


def test_failed_finetune_stalls_dependent(cluster, operator, ns, simulator):
    cluster.create(finetune("bad"), ns)
    cluster.create(batchinference("after-bad", fine_tune="bad"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "bad")) == "Running", timeout=90, what="FineTune Running")
    _finish(simulator, cluster, ns, "FineTune", "bad", "bad-ft", Plan("Failed", "out of memory"))
    bi = wait_for(lambda: (lambda o: o if condition(o, "Stalled").get("status") == "True" else None)(
        cluster.get("BatchInference", ns, "after-bad")), what="Stalled")
    assert condition(bi, "Stalled")["reason"] == "FineTuneFailed"


def test_bad_input_stalls_and_reports_no_output(cluster, operator, ns, simulator):
    cluster.create(batchinference("badinput"), ns)
    wait_for(lambda: phase(cluster.get("BatchInference", ns, "badinput")) == "Running", timeout=90, what="Running")
    message = "input row has no field 'input' named by spec.prompt.userField; fields present: text, label"
    _finish(simulator, cluster, ns, "BatchInference", "badinput", "badinput-bi", Plan("Failed", message))
    bi = cluster.get("BatchInference", ns, "badinput")
    assert phase(bi) == "Failed"
    assert condition(bi, "Stalled")["reason"] == "PayloadFailed"
    assert "spec.prompt.userField" in condition(bi, "Stalled")["message"]
    assert "outputURI" not in bi["status"]


def test_deleted_rayjob_fails_the_run_and_is_not_recreated(cluster, operator, ns):
    cluster.create(batchinference("lost"), ns)
    wait_for(lambda: phase(cluster.get("BatchInference", ns, "lost")) == "Running", timeout=90, what="Running")
    cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", "lost-bi")
    bi = wait_for(lambda: (lambda o: o if phase(o) == "Failed" else None)(cluster.get("BatchInference", ns, "lost")),
                  timeout=90, what="Failed")
    stalled = condition(bi, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "RayJobDeleted"
    assert "RayJob lost-bi was deleted" in stalled["message"]
    assert "delete this BatchInference and create it again" in stalled["message"]
    assert "outputURI" not in bi["status"] and "metrics" not in bi["status"]
    wait_for(lambda: cluster.ray("rayjobs", ns, "lost-bi") is None, timeout=60, what="the RayJob to go")
    time.sleep(3)
    assert cluster.ray("rayjobs", ns, "lost-bi") is None
    assert phase(cluster.get("BatchInference", ns, "lost")) == "Failed"
