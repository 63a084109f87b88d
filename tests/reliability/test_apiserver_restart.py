"""The kube-apiserver goes away mid-run and comes back (same port, certificates, etcd): the operator process keeps
running, reconnects its watches by itself, and converges: a resource created after the restart gets its RayJob
and status, and a job that was running before the outage and finishes after it (its RayJob and result
ConfigMap change while the operator's watches are new) ends Succeeded.

CI: two outages of ~10 s (one SIGKILL; one SIGTERM, whose graceful shutdown itself takes ~20 s more). Long: also
one of 70 s, longer than kopf's whole retry schedule for a request (settings.networking.error_backoffs:
1+2+5+10+30 s), and the jobs created after each restart are run to the end too (a FineTune and a BatchInference
on its adapter)."""

from __future__ import annotations

import signal
import time

import pytest
import urllib3
from kubernetes.client.rest import ApiException

from integration.harness import phase
from manifests import batchinference, finetune
from reliability.control import restart_apiserver, simulator_running, unhandled_errors
from reliability.support import duplicates, orphans, inventory, settled, wait_until

pytestmark = pytest.mark.integration


def tolerant(check):
    """A check that reads 'not yet' while the API server is unreachable or still starting."""
    def run():
        try:
            return check()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            if isinstance(e, ApiException) and e.status and e.status < 500 and e.status != 429:
                raise
            return None
    return run


def create_once(cluster, doc: dict, ns: str) -> bool:
    try:
        cluster.create(doc, ns)
    except ApiException as e:
        if e.status != 409:  # 409: an earlier attempt got through before its answer was lost
            raise
    return True


def test_operator_reconnects_after_apiserver_restarts(plane, cluster, ns, operators, long_run, record):
    outages = [(signal.SIGKILL, 10), (signal.SIGTERM, 10)] + ([(signal.SIGKILL, 70)] if long_run else [])
    op = operators.start(ns, name="operator")
    downtime, reconnect, finish = [], [], []
    for i, (sig, seconds) in enumerate(outages):
        before, after = f"before-{i}", f"after-{i}"
        cluster.create(finetune(before), ns)
        ok, _ = wait_until(tolerant(lambda: phase(cluster.get("FineTune", ns, before)) == "Running"), timeout=120)
        assert ok, f"{before} never ran"

        downtime.append(round(restart_apiserver(plane, seconds, sig), 1))
        back = time.monotonic()
        assert op.popen.poll() is None, f"the operator exited while the API server was away:\n{op.log()[-3000:]}"

        ok, _ = wait_until(tolerant(lambda: create_once(cluster, finetune(after), ns)), timeout=60)
        assert ok, "could not create a resource after the restart"
        if long_run:
            create_once(cluster, batchinference(f"eval-{i}", fine_tune=after), ns)
        ok, _ = wait_until(tolerant(lambda: cluster.ray("rayjobs", ns, f"{after}-ft")
                                    and settled(cluster.get("FineTune", ns, after))), timeout=120)
        assert ok, f"no RayJob/status for {after}, created after the restart:\n{op.log()[-3000:]}"
        reconnect.append(round(time.monotonic() - back, 1))

        # The watches on children are new too: a job finishing now (its RayJob status and result ConfigMap
        # change) still lands. Long: also the job started after the restart, and a BatchInference that wakes up
        # when that FineTune succeeds.
        wanted = [("FineTune", before)] + ([("FineTune", after), ("BatchInference", f"eval-{i}")] if long_run else [])
        with simulator_running(plane, ns):
            ok, _ = wait_until(tolerant(lambda: all(phase(cluster.get(k, ns, n)) == "Succeeded" for k, n in wanted)),
                               timeout=240)
        assert ok, f"jobs did not finish after restart {i}: " + ", ".join(
            f"{n}={phase(cluster.get(k, ns, n))}" for k, n in wanted)
        assert op.popen.poll() is None
        finish.append(round(time.monotonic() - back, 1))

    inv = inventory(cluster, ns)
    dup, orph = duplicates(inv), orphans(inv)
    tracebacks = unhandled_errors(op.log())
    record(apiserver_restarts=len(outages), downtime_seconds=downtime, new_resource_served_after_s=reconnect,
           all_jobs_succeeded_after_s=finish, resources=len(inv.resources),
           duplicates=len(dup), orphans=len(orph), operator_restarts=0, traceback_lines=len(tracebacks))
    assert not dup and not orph, (dup, orph)
    assert not tracebacks, "unhandled exceptions while the API server was away:\n" + "\n".join(tracebacks[:20])
