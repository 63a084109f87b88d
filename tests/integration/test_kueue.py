"""Queueing through Kueue on the real local plane: a ClusterQueue holding 8 of the simulated L4 GPUs, three
FineTunes of 4 GPUs each. Kueue (built from source, run beside KubeRay) admits two; the third shows Queued with
Kueue's reason until one finishes, then runs."""

from __future__ import annotations

import json

import pytest

from integration.harness import phase, restricted_operator, wait_for
from llmops.builders.common import QUEUE_LABEL
from llmops.dev.simulator import Simulator
from manifests import finetune

pytestmark = pytest.mark.integration

KUEUE = "kueue.x-k8s.io/v1beta2"


@pytest.fixture(scope="session")
def kueue(plane):
    """Kueue on the session's plane, started by the first test that needs it (the other tests never pay for it;
    it leaves alone every job that names no queue)."""
    plane.start_kueue()
    return plane


def _apply(plane, *objects: dict) -> None:
    plane.kubectl("apply", "--server-side", "-f", "-", quiet=True,
                  input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def _queue(plane, ns: str) -> str:
    """A ResourceFlavor, a ClusterQueue with 8 L4 GPUs for `ns` alone, and LocalQueue `gpu` in `ns`."""
    cluster_queue = f"l4-{ns}"
    _apply(plane,
           # No nodeLabels: Kueue would put them on every pod set, the CPU-only Ray head's too.
           {"apiVersion": KUEUE, "kind": "ResourceFlavor", "metadata": {"name": "l4"}, "spec": {}},
           {"apiVersion": KUEUE, "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
            "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                     "resourceGroups": [{
                         "coveredResources": ["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"],
                         "flavors": [{"name": "l4", "resources": [
                             {"name": "cpu", "nominalQuota": "1000"},
                             {"name": "memory", "nominalQuota": "4Ti"},
                             {"name": "ephemeral-storage", "nominalQuota": "100Ti"},
                             {"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]}},
           {"apiVersion": KUEUE, "kind": "LocalQueue", "metadata": {"name": "gpu", "namespace": ns},
            "spec": {"clusterQueue": cluster_queue}})
    return cluster_queue


def _queued_finetune(name: str) -> dict:
    body = finetune(name)
    body["spec"]["queueName"] = "gpu"
    body["spec"]["resources"].update(workers=1, gpusPerWorker=4)
    return body


def test_queue_admits_two_and_the_third_when_one_finishes(cluster, operator, kueue, ns):
    cluster_queue = _queue(kueue, ns)
    try:
        names = ["a", "b", "c"]
        for name in names:
            cluster.create(_queued_finetune(name), ns)

        def settled():
            fts = {n: cluster.get("FineTune", ns, n) for n in names}
            phases = sorted(phase(ft) or "" for ft in fts.values())
            queued = [ft for ft in fts.values() if phase(ft) == "Queued"]
            # The operator reads the Workload again every few seconds: Kueue may make it after the first look.
            with_reason = queued and "insufficient unused quota" in queued[0]["status"].get("message", "")
            return fts if phases == ["Queued", "Running", "Running"] and with_reason else None
        fts = wait_for(settled, timeout=150, what="two FineTunes Running and one Queued with Kueue's reason")
        waiting = next(n for n, ft in fts.items() if phase(ft) == "Queued")
        running = [n for n in names if n != waiting]

        # Kueue's own words on why it waits, from its Workload.
        ready = next(c for c in fts[waiting]["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and ready["reason"] == "Queued", ready
        assert "LocalQueue gpu" in ready["message"] and "nvidia.com/gpu" in ready["message"], ready["message"]
        job = cluster.ray("rayjobs", ns, f"{waiting}-ft")
        assert job["metadata"]["labels"][QUEUE_LABEL] == "gpu"
        assert job["spec"]["suspend"] is True   # Kueue's doing: the operator never writes the field
        managers = {m["manager"] for m in job["metadata"]["managedFields"]
                    if "f:suspend" in (m.get("fieldsV1", {}).get("f:spec") or {})}
        assert managers and "llmops" not in managers, managers
        for name in running:
            assert not cluster.ray("rayjobs", ns, f"{name}-ft")["spec"].get("suspend")

        # One finishes (the simulator plays the Ray job): its quota goes back and the third is admitted.
        Simulator(kueue.kubeconfig, run_seconds=0, namespace=ns, only={f"{running[0]}-ft"}).step()
        wait_for(lambda: phase(cluster.get("FineTune", ns, running[0])) == "Succeeded", timeout=60,
                 what=f"FineTune {running[0]} to succeed")
        wait_for(lambda: phase(cluster.get("FineTune", ns, waiting)) == "Running", timeout=150,
                 what=f"the queued FineTune {waiting} to be admitted and run")
        assert phase(cluster.get("FineTune", ns, running[1])) == "Running"
    finally:
        kueue.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False, quiet=True)


def test_a_queued_job_under_restricted_pod_security_is_admitted_and_runs(plane, cluster, kueue, tmp_path, alone):
    """`ray_pod_security: restricted` gives the RayJob a submitter pod template: Kueue takes it as the job's
    submitter pod set, admits the job, and the restricted namespace admits every pod (docs/clusters.md)."""
    with restricted_operator(plane, cluster, tmp_path, "queued-restricted") as ns:
        cluster_queue = _queue(kueue, ns)
        try:
            cluster.create(_queued_finetune("q"), ns)
            wait_for(lambda: phase(cluster.get("FineTune", ns, "q")) == "Running", timeout=150,
                     what="the queued FineTune admitted by Kueue and Running")
            workloads = kueue.kubectl("get", "workloads", "-n", ns, "-o", "json", quiet=True).stdout
            pod_sets = json.loads(workloads)["items"][0]["spec"]["podSets"]
            assert "submitter" in [s["name"] for s in pod_sets], pod_sets
            submitter = wait_for(lambda: cluster.core.list_namespaced_pod(ns, label_selector="job-name=q-ft").items,
                                 timeout=60, what="KubeRay's submitter pod, admitted")
            assert submitter[0].spec.security_context.run_as_non_root is True
        finally:
            kueue.kubectl("delete", "clusterqueue", cluster_queue, "--wait=false", check=False, quiet=True)
