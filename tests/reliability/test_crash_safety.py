"""Crash safety: kill -9 the operator at random points while dozens of resources progress, then prove the end
state is the one an uninterrupted operator would reach: one Ray object per resource, no orphans, every status
converged and consistent with its child, and nothing written any more.

CI: 60 resources (20 FineTunes, 20 BatchInferences, 20 LLMServices), 10 kills. Long (--long / LLMOPS_LONG=1):
200 resources, 25 kills. The simulator finishes every job meanwhile; half the BatchInferences evaluate a
FineTune's adapter, half the LLMServices serve it behind a gate on that evaluation, so a crash can land anywhere
in a three-step chain.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from integration.harness import condition, phase
from manifests import batchinference, finetune, llmservice
from reliability.control import simulator_running, unhandled_errors
from reliability.support import (
    child_generations,
    duplicates,
    eventually_quiet,
    inventory,
    metric,
    missing_ray_child,
    orphans,
    resource_versions,
    settled,
    unconverged,
    wait_until,
)

pytestmark = pytest.mark.integration

QUIET_SECONDS = 6  # a converged operator writes nothing during this window


def workload(n: int) -> list[dict]:
    """n resources: a third FineTunes, a third BatchInferences (every other one on a FineTune's adapter), a third
    LLMServices (every other one serving a FineTune's adapter gated on its evaluation). Services scale to zero
    GPU workers so they do not starve the jobs of GPUs."""
    k = max(1, n // 3)
    docs = []
    for i in range(k):
        ft = finetune(f"ft-{i}")
        ft["spec"]["resources"].update(workers=1, gpusPerWorker=1)
        docs.append(ft)
    for i in range(k):
        bi = batchinference(f"bi-{i}", fine_tune=f"ft-{i}" if i % 2 == 0 else None)
        docs.append(bi)
    for i in range(k):
        adapters = [{"name": f"ft-{i}", "fineTuneRef": {"name": f"ft-{i}"},
                     "gate": {"batchInferenceRef": {"name": f"bi-{i}"}, "metric": "exactMatch", "minimum": 0.5}}] \
            if i % 2 == 0 else None
        svc = llmservice(f"svc-{i}", adapters)
        svc["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 1}
        docs.append(svc)
    return docs


def done(inv) -> list[str]:
    """What still keeps the workload from its end state (empty: converged)."""
    waiting = []
    for r in inv.resources:
        name = f"{r['kind']}/{r['metadata']['name']}"
        if r["kind"] in ("FineTune", "BatchInference"):
            if phase(r) != "Succeeded":
                waiting.append(f"{name} is {phase(r)} ({condition(r, 'Ready').get('reason')})")
        else:
            states = [a.get("state") for a in (r.get("status") or {}).get("adapters") or []]
            if any(s != "Serving" for s in states):
                waiting.append(f"{name} adapters {states}")
        if settled(r) is None:
            waiting.append(f"{name} not settled ({(r.get('status') or {}).get('phase')})")
    return waiting


def consistency(inv, cluster, ns) -> list[str]:
    """Status agrees with the children and the payload's report."""
    problems = []
    results = {c["metadata"]["name"]: c.get("data") or {} for c in inv.children["ConfigMap"]
               if (c["metadata"].get("labels") or {}).get("llmops.dev/role") == "result"}
    finetunes = {r["metadata"]["name"]: r for r in inv.resources if r["kind"] == "FineTune"}
    for r in inv.resources:
        name, status = r["metadata"]["name"], r.get("status") or {}
        if r["kind"] == "FineTune":
            report = results.get(f"{name}-ft-result", {})
            if report.get("state") != "Succeeded":
                problems.append(f"FineTune/{name} Succeeded but its result ConfigMap says {report.get('state')}")
            if (status.get("adapter") or {}).get("uri") != f"s3://bucket/adapters/{name}":
                problems.append(f"FineTune/{name} adapter {status.get('adapter')}")
            if condition(r, "Ready").get("status") != "True":
                problems.append(f"FineTune/{name} Succeeded without Ready=True")
        elif r["kind"] == "BatchInference":
            if (status.get("metrics") or {}).get("exactMatch") is None:
                problems.append(f"BatchInference/{name} has no metrics: {status}")
            ref = ((r["spec"].get("model") or {}).get("fineTuneRef") or {}).get("name")
            if ref and status.get("adapterURI") != (finetunes[ref]["status"].get("adapter") or {}).get("uri"):
                problems.append(f"BatchInference/{name} adapterURI {status.get('adapterURI')} is not {ref}'s")
        else:
            adapters = [a["name"] for a in r["spec"].get("adapters") or []]
            want = ["ft-model", *(f"ft-model:{a}" for a in adapters)]
            if status.get("models") != want:
                problems.append(f"LLMService/{name} models {status.get('models')} != {want}")
            if status.get("rayServiceName") != f"{name}-llm":
                problems.append(f"LLMService/{name} rayServiceName {status.get('rayServiceName')}")
    return problems


def test_kill9_at_random_points_converges(plane, cluster, ns, operators, capacity, long_run, record):
    n, kills_wanted = (200, 25) if long_run else (60, 10)
    seed = int(os.environ.get("LLMOPS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"crash-safety seed {seed} (LLMOPS_SEED={seed} repeats the kill schedule)")
    docs = workload(n)
    chunks = [docs[i::4] for i in range(4)]  # mixed kinds in each chunk; dependents may come before their refs
    started = time.monotonic()

    op = operators.start(ns, name="op-0")
    for doc in chunks.pop(0):
        cluster.create(doc, ns)
    kills, in_flight = 0, []
    with simulator_running(plane, ns, run_seconds=3):
        # At least kills_wanted kills, and on until half the workload has finished (at most twice as many), so that
        # kills land in every stage: creation, cluster start-up, running jobs, results, dependents waking up.
        while True:
            time.sleep(rng.uniform(0.0, 3.0))  # 0: right after start-up, in the middle of the initial burst
            op.kill()
            assert op.popen.wait(10) == -9
            kills += 1
            in_flight.append(len({w.split(" ")[0] for w in done(inventory(cluster, ns))}))
            if chunks and (rng.random() < 0.5 or kills >= 3):  # resources created while no operator runs
                for doc in chunks.pop(0):
                    cluster.create(doc, ns)
            op = operators.start(ns, name=f"op-{kills}")
            if chunks and rng.random() < 0.5:  # ... or while the new one lists and reconciles
                for doc in chunks.pop(0):
                    cluster.create(doc, ns)
            halfway = not chunks and in_flight[-1] <= len(docs) // 2
            if kills >= kills_wanted and (halfway or kills >= 2 * kills_wanted):
                break
        churn = time.monotonic() - started
        ok, _ = wait_until(lambda: not done(inventory(cluster, ns)), timeout=600 if long_run else 300, interval=2)
    if not ok:
        stuck = done(inventory(cluster, ns))
        record(resources=len(docs), kills_survived=kills, unfinished_at_each_kill=in_flight, not_converged=len(stuck),
               seed=seed)
        pytest.fail(f"not converged after {kills} kills: {stuck[:20]}")
    converged = time.monotonic() - started

    inv = inventory(cluster, ns)
    dup, orph, missing, stale = duplicates(inv), orphans(inv), missing_ray_child(inv), unconverged(inv)
    inconsistent = consistency(inv, cluster, ns)

    # Stable: no status or child writes in a quiet window (the simulator has stopped; nothing is in flight).
    def observe() -> dict:
        now = inventory(cluster, ns)
        return {**resource_versions(now), **child_generations(now),
                "operator PATCH requests": metric(op.metrics(), "llmops_api_requests_total", verb="PATCH")}
    quiet, moved = eventually_quiet(observe, QUIET_SECONDS, timeout=60)
    errors = unhandled_errors(operators.logs())

    record(resources=len(inv.resources), kills_survived=kills, operators_started=len(operators.started),
           ray_objects=sum(len(inv.children[k]) for k in ("RayJob", "RayService")),
           children=sum(len(v) for v in inv.children.values()), duplicates=len(dup), orphans=len(orph),
           unconverged=len(stale) + len(missing) + len(inconsistent), writes_when_quiet=len(moved),
           unhandled_exceptions=len(errors), unfinished_at_each_kill=in_flight, churn_seconds=round(churn),
           converged_seconds=round(converged),
           seed=seed)
    assert kills >= kills_wanted
    assert sum(1 for x in in_flight if x) >= kills_wanted // 2, f"most kills hit an idle workload: {in_flight}"
    assert len(inv.resources) == n // 3 * 3
    assert not dup, f"duplicate Ray objects: {dup}"
    assert not orph, f"orphaned children: {orph}"
    assert not missing, missing
    assert not stale, stale
    assert not inconsistent, inconsistent
    assert quiet, f"still writing {QUIET_SECONDS}s windows after convergence: {moved}"
    assert not errors, "unhandled exceptions in the operator logs:\n" + "\n".join(errors[:20])


def test_result_report_seen_after_job_end_is_not_lost(plane, cluster, ns, operators, record):
    """Watches of different kinds are not ordered: the operator may see the RayJob end before it sees the payload's
    report in the result ConfigMap (a lagging or re-listing ConfigMap watch; an operator that lists RayJobs after
    the job ended but listed ConfigMaps before the report). A finished job whose report shows up a moment later must
    end Succeeded, not be frozen as Failed/NoResultReported. Here the two writes come in that order, a second
    apart, each as its writer makes it (KubeRay's status; the payload's report with the job's own token)."""
    from llmops.dev.simulator import Simulator

    operators.start(ns, name="operator")
    cluster.create(finetune("late"), ns)
    ok, _ = wait_until(lambda: phase(cluster.get("FineTune", ns, "late")) == "Running", timeout=120)
    assert ok, "the FineTune never ran"
    sim = Simulator(plane.kubeconfig, namespace=ns)
    job = cluster.ray("rayjobs", ns, "late-ft")
    sim._set_job_status(job, "Complete", "SUCCEEDED")            # what KubeRay writes when the job ends
    ok, _ = wait_until(lambda: (cluster.get("FineTune", ns, "late").get("status") or {}).get("phase") != "Running",
                       timeout=3, interval=0.2)
    seen = phase(cluster.get("FineTune", ns, "late"))
    sim._report(job, "Succeeded", "simulated: the job finished",  # the payload's report, seen a moment later
                adapter={"uri": "s3://bucket/adapters/late", "baseModel": "Qwen/Qwen2.5-7B-Instruct", "rank": 8},
                metrics={"trainLoss": 0.2})
    ok, _ = wait_until(lambda: phase(cluster.get("FineTune", ns, "late")) == "Succeeded", timeout=30)
    ft = cluster.get("FineTune", ns, "late")
    record(phase_between_job_end_and_report=seen, final_phase=phase(ft),
           final_reason=condition(ft, "Ready").get("reason"))
    assert ok, (f"the report came a moment after the RayJob ended, yet the FineTune stays {phase(ft)} "
                f"({condition(ft, 'Stalled').get('reason')}: {condition(ft, 'Stalled').get('message')}); "
                f"its result ConfigMap says state="
                f"{cluster.core.read_namespaced_config_map('late-ft-result', ns).data.get('state')}")
