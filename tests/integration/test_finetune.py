"""FineTune on the real local plane: RayJob content, KubeRay's cluster on the L4 pool, status, suspend, GC."""

from __future__ import annotations

import datetime
import json
import time

import pytest

from integration.harness import _unless_absent, condition, phase, wait_for
from llmops.dev.simulator import Plan, Simulator
from llmops.status import SCALE_UP_GRACE_SECONDS
from manifests import finetune

pytestmark = pytest.mark.integration


@pytest.fixture()
def simulator(plane, ns):
    return Simulator(plane.kubeconfig, run_seconds=0, namespace=ns)


def _rayjob(cluster, ns, name="ft"):
    return cluster.ray("rayjobs", ns, f"{name}-ft")


def _finish(simulator, cluster, ns, name, plan=None):
    job = f"{name}-ft"
    if plan:
        simulator.plans[(ns, job)] = plan
    wait_for(lambda: (simulator.step() or True) and phase(cluster.get("FineTune", ns, name)) in ("Succeeded", "Failed"),
             timeout=90, what=f"FineTune {name} to finish")


def test_finetune_runs_on_the_l4_pool(cluster, operator, ns):
    cluster.create(finetune("ft"), ns)
    job = wait_for(lambda: _rayjob(cluster, ns), what="the RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m payloads.finetune --config /etc/llmops/job/job.json"
    assert spec["shutdownAfterJobFinishes"] is True and not spec.get("suspend", False)
    assert "USE_RAY: '1'" in spec["runtimeEnvYAML"] or 'USE_RAY: "1"' in spec["runtimeEnvYAML"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 2
    pod = worker["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["serviceAccountName"] == "ft-ft-ray"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTune"

    # The RayJob is written first (the work starts); what its pods read follows moments later.
    config = wait_for(lambda: cluster.config_map(ns, "ft-ft-config"), what="the job ConfigMap")
    assert "train.yaml" in config.data and "dataset_info.json" in config.data
    payloads = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "llmops-payloads")
    assert "finetune.py" in wait_for(lambda: cluster.config_map(ns, payloads), what="the payload ConfigMap").data
    assert json.loads(config.data["job.json"])["output"]["uri"] == "s3://bucket/adapters/ft"

    # KubeRay (real) creates the cluster; the scheduler places it; kwok runs it.
    def placed():
        pods = cluster.pods(ns, "ray.io/is-ray-node=yes")
        running = [p for p in pods if p.status.phase == "Running"]
        return pods if len(pods) == 3 and len(running) == 3 else None
    pods = wait_for(placed, timeout=90, what="3 Running Ray pods")
    nodes = {p.metadata.labels["ray.io/node-type"]: [] for p in pods}
    for p in pods:
        nodes[p.metadata.labels["ray.io/node-type"]].append(p.spec.node_name)
    assert all(n.startswith("l4-") for n in nodes["worker"]), nodes
    assert nodes["head"] == ["cpu-0"], nodes

    ft = wait_for(lambda: (lambda o: o if phase(o) == "Running" else None)(cluster.get("FineTune", ns, "ft")),
                  timeout=60, what="phase Running")
    assert condition(ft, "Reconciling")["status"] == "True"
    assert condition(ft, "Ready")["status"] == "False"
    assert ft["status"]["observedGeneration"] == ft["metadata"]["generation"]
    assert ft["status"]["rayClusterName"].startswith("ft-ft")


def test_result_report_makes_it_ready(cluster, operator, ns, simulator):
    cluster.create(finetune("ready"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "ready")) == "Running", timeout=90, what="Running")
    _finish(simulator, cluster, ns, "ready")
    ft = cluster.get("FineTune", ns, "ready")
    assert phase(ft) == "Succeeded"
    ready = condition(ft, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Succeeded"
    assert condition(ft, "Stalled")["status"] == "False" and condition(ft, "Reconciling")["status"] == "False"
    assert ft["status"]["adapter"] == {"uri": "s3://bucket/adapters/ready", "baseModel": "Qwen/Qwen2.5-7B-Instruct",
                                       "rank": 8}
    assert ft["status"]["metrics"]["trainLoss"] > 0 and ft["status"]["metrics"]["simulated"] is True
    assert ft["status"]["completionTime"]
    # The Event follows the status write (status goes first), so it may land a moment later.
    wait_for(lambda: "Succeeded" in {e.reason for e in cluster.core.list_namespaced_event(
        ns, field_selector="involvedObject.name=ready").items}, timeout=30, what="a Succeeded event")


def test_job_failure_stalls_with_reason(cluster, operator, ns, simulator):
    cluster.create(finetune("boom"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "boom")) == "Running", timeout=90, what="Running")
    _finish(simulator, cluster, ns, "boom", Plan("Failed", "training diverged: loss is NaN at step 40"))
    ft = cluster.get("FineTune", ns, "boom")
    assert phase(ft) == "Failed"
    stalled = condition(ft, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "PayloadFailed"
    assert "loss is NaN" in stalled["message"]


def _unschedulable_pod(cluster, ns):
    for pod in cluster.pods(ns, "ray.io/is-ray-node=yes"):
        for c in pod.status.conditions or []:
            if c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable":
                return pod, c
    return None


def test_unschedulable_pool_waits_for_a_scale_up_then_stalls(cluster, operator, ns):
    doc = finetune("big")
    doc["spec"]["resources"].update(workers=1, gpusPerWorker=8)   # no L4 node has more than 4 GPUs
    cluster.create(doc, ns)
    ft = wait_for(lambda: (lambda o: o if condition(o, "Reconciling").get("reason") == "Unschedulable" else None)(
        cluster.get("FineTune", ns, "big")), timeout=90, what="Reconciling: Unschedulable")
    waiting = condition(ft, "Reconciling")
    assert waiting["status"] == "True" and condition(ft, "Stalled")["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in waiting["message"] and "spec.resources" in waiting["message"]
    assert "then this stalls" in waiting["message"] and ".." not in waiting["message"], waiting["message"]

    # A node pool that never fits it: as if the pod had waited past the grace period (its condition says since
    # when; the scheduler keeps that time while the pod stays unschedulable).
    pod, scheduled = wait_for(lambda: _unschedulable_pod(cluster, ns), what="the unschedulable pod")
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=SCALE_UP_GRACE_SECONDS + 60)
    cluster.core.patch_namespaced_pod_status(pod.metadata.name, ns, {"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": scheduled.message,
        "lastTransitionTime": since.strftime("%Y-%m-%dT%H:%M:%SZ")}]}})
    ft = wait_for(lambda: (lambda o: o if condition(o, "Stalled").get("status") == "True" else None)(
        cluster.get("FineTune", ns, "big")), timeout=60, what="Stalled")
    stalled = condition(ft, "Stalled")
    assert stalled["reason"] == "Unschedulable" and phase(ft) == "Pending"
    assert "No node has fit it for 10 minutes" in stalled["message"] and "spec.resources" in stalled["message"]


def test_deleted_rayjob_fails_the_run_and_is_not_recreated(cluster, operator, ns):
    cluster.create(finetune("lost"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "lost")) == "Running", timeout=90, what="Running")
    cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", "lost-ft")
    ft = wait_for(lambda: (lambda o: o if phase(o) == "Failed" else None)(cluster.get("FineTune", ns, "lost")),
                  timeout=90, what="Failed")
    stalled = condition(ft, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "RayJobDeleted"
    assert "RayJob lost-ft was deleted" in stalled["message"]
    assert "delete this FineTune and create it again" in stalled["message"] and "spec.suspend" in stalled["message"]
    assert ft["status"]["completionTime"]
    # Gone for good: KubeRay finishes the deletion, and nothing creates the RayJob again.
    wait_for(lambda: _rayjob(cluster, ns, "lost") is None, timeout=60, what="the RayJob to go")
    time.sleep(3)
    assert _rayjob(cluster, ns, "lost") is None
    assert phase(cluster.get("FineTune", ns, "lost")) == "Failed"
    wait_for(lambda: any(e.reason == "RayJobDeleted" and e.type == "Warning" for e in cluster.core.list_namespaced_event(
        ns, field_selector="involvedObject.name=lost").items), timeout=30, what="a RayJobDeleted warning")


def test_suspend_and_resume(plane, cluster, operator, ns):
    cluster.create(finetune("pause"), ns)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "pause")) == "Running", timeout=90, what="Running")
    cluster.patch("FineTune", ns, "pause", {"spec": {"suspend": True}})
    wait_for(lambda: (_rayjob(cluster, ns, "pause") or {}).get("spec", {}).get("suspend") is True, what="suspend")
    ft = wait_for(lambda: (lambda o: o if phase(o) == "Suspended" else None)(cluster.get("FineTune", ns, "pause")),
                  timeout=90, what="Suspended")
    # Suspended=True in place of Ready (kstatus reads Ready=False as in progress); the REASON column says it.
    assert condition(ft, "Suspended")["status"] == "True" and not condition(ft, "Ready")
    assert condition(ft, "Reconciling")["status"] == "False" and condition(ft, "Stalled")["status"] == "False"
    table = plane.kubectl("get", "ft", "pause", "-n", ns, quiet=True).stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "PHASE", "BASE", "MODEL", "REASON"], table
    assert table[1].split()[:4] == ["pause", "Suspended", "Qwen/Qwen2.5-7B-Instruct", "Suspended"], table
    wait_for(lambda: not cluster.ray_list("rayclusters", ns), timeout=90, what="the RayCluster to go")
    cluster.patch("FineTune", ns, "pause", {"spec": {"suspend": False}})
    ft = wait_for(lambda: (lambda o: o if phase(o) == "Running" else None)(cluster.get("FineTune", ns, "pause")),
                  timeout=90, what="Running again")
    assert cluster.ray_list("rayclusters", ns)
    assert not condition(ft, "Suspended") and condition(ft, "Ready")["status"] == "False"


def test_deletion_garbage_collects_children(cluster, operator, ns):
    cluster.create(finetune("gone"), ns)
    wait_for(lambda: _rayjob(cluster, ns, "gone"), what="the RayJob")
    cluster.delete("FineTune", ns, "gone")

    def children_left():
        left = [c.metadata.name for c in cluster.core.list_namespaced_config_map(ns).items
                if c.metadata.name.startswith("gone-")]
        left += [s.metadata.name for s in cluster.core.list_namespaced_service_account(ns).items
                 if s.metadata.name.startswith("gone-")]
        left += [j["metadata"]["name"] for j in cluster.ray_list("rayjobs", ns)]
        left += [r.metadata.name for r in cluster.rbac.list_namespaced_role(ns).items]
        return left
    wait_for(lambda: not children_left(), timeout=90, what="garbage collection")


def test_spec_invalid_past_admission_stalls_without_children(cluster, operator, ns):
    doc = finetune("managed")
    doc["spec"]["extraArgs"] = {"output_dir": "/tmp/elsewhere", "seed": 7}
    cluster.create(doc, ns)
    ft = wait_for(lambda: (lambda o: o if phase(o) == "Failed" else None)(cluster.get("FineTune", ns, "managed")),
                  what="Failed")
    stalled = condition(ft, "Stalled")
    assert stalled["reason"] == "InvalidSpec" and stalled["message"].startswith("spec.extraArgs may not set ")
    assert "output_dir" in stalled["message"] and "Value error" not in stalled["message"]
    assert _rayjob(cluster, ns, "managed") is None


def test_ray_pods_may_only_patch_their_result(cluster, operator, ns):
    from kubernetes import client
    cluster.create(finetune("rights"), ns)
    wait_for(lambda: _rayjob(cluster, ns, "rights"), what="the RayJob")
    user = f"system:serviceaccount:{ns}:rights-ft-ray"

    def allowed(verb, resource, name=""):
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
            resource_attributes=client.V1ResourceAttributes(namespace=ns, verb=verb, resource=resource, name=name)))
        return cluster.auth.create_subject_access_review(review).status.allowed

    wait_for(lambda: allowed("patch", "configmaps", "rights-ft-result"), what="the Role to bind")
    assert allowed("get", "configmaps", "rights-ft-result")
    assert not allowed("patch", "configmaps", "rights-ft-config")
    assert not allowed("list", "configmaps")
    assert not allowed("get", "secrets", "hf-token")
    assert not allowed("create", "pods")


def test_pods_run_as_the_specs_own_account_with_only_the_result_channel_added(cluster, operator, ns, simulator):
    """spec.serviceAccountName (an account annotated for IRSA or Workload Identity): the operator creates none,
    the Ray pods run as it, the payload reports through it, and it gains get/patch on this result ConfigMap only."""
    from integration.rbac import ServiceAccount, allowed
    annotations = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/llmops-ray"}
    cluster.core.create_namespaced_service_account(ns, {"metadata": {"name": "ml-identity",
                                                                     "annotations": annotations}})
    doc = finetune("own")
    doc["spec"]["serviceAccountName"] = "ml-identity"
    cluster.create(doc, ns)
    job = wait_for(lambda: _rayjob(cluster, ns, "own"), what="the RayJob")
    cluster_spec = job["spec"]["rayClusterSpec"]
    pods = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    assert {g["template"]["spec"]["serviceAccountName"] for g in pods} == {"ml-identity"}
    binding = wait_for(lambda: _unless_absent(lambda: cluster.rbac.read_namespaced_role_binding("own-ft-ray", ns)),
                       what="the result RoleBinding")
    assert [(s.kind, s.name) for s in binding.subjects] == [("ServiceAccount", "ml-identity")]
    assert [a.metadata.name for a in cluster.core.list_namespaced_service_account(ns).items
            if a.metadata.name.startswith("own-")] == []

    account = ServiceAccount(ns, "ml-identity")
    wait_for(lambda: allowed(cluster, account, "patch", "configmaps", namespace=ns, name="own-ft-result"),
             what="the binding to take effect")
    assert allowed(cluster, account, "get", "configmaps", namespace=ns, name="own-ft-result")
    for verb, resource, name in [("get", "configmaps", "own-ft-config"), ("list", "configmaps", ""),
                                 ("delete", "configmaps", "own-ft-result"), ("get", "secrets", ""),
                                 ("create", "pods", ""), ("patch", "rayjobs", "own-ft")]:
        group = "ray.io" if resource == "rayjobs" else ""
        assert not allowed(cluster, account, verb, resource, group, namespace=ns, name=name), (verb, resource, name)

    # the payload's report goes through that account (the simulator posts it with the account's token)
    wait_for(lambda: phase(cluster.get("FineTune", ns, "own")) == "Running", timeout=90, what="Running")
    _finish(simulator, cluster, ns, "own")
    assert phase(cluster.get("FineTune", ns, "own")) == "Succeeded"
    assert cluster.core.read_namespaced_service_account("ml-identity", ns).metadata.annotations == annotations


def test_a_worker_lost_with_its_node_is_preempted_then_resumes(plane, cluster, operator, ns):
    """A spot node reclaimed mid-run: its worker pod is evicted (Kubernetes marks it DisruptionTarget) and its
    Node deleted, the Ray job fails as Ray Train does on a lost worker (the simulator plays that part and
    KubeRay's retry step, which KubeRay cannot take here without a Ray dashboard), KubeRay replaces the cluster
    and the second attempt finishes. The status reads Preempted, then Resuming, never Failed, and shows the
    retry budget."""
    from llmops.dev.nodes import register_pools

    doc = finetune("spot")
    doc["spec"]["backoffLimit"] = 1
    cluster.create(doc, ns)
    sim = Simulator(plane.kubeconfig, run_seconds=3600, namespace=ns)   # runs until a worker is lost
    seen: list[tuple[str, str]] = []

    def watch(until):
        def check():
            sim.step()
            ft = cluster.get("FineTune", ns, "spot") or {}
            ready = condition(ft, "Ready") if ft.get("status", {}).get("conditions") else {}
            entry = (phase(ft), ready.get("reason"))
            if entry[1] and (not seen or seen[-1] != entry):
                seen.append(entry)
            return ft if until(ft) else None
        return check

    ft = wait_for(watch(lambda o: condition(o, "Ready").get("reason") == "JobRunning"), timeout=120, what="Running")
    assert ft["status"]["retries"] == {"used": 0, "limit": 1}
    cluster_name = ft["status"]["rayClusterName"]
    wait_for(lambda: sim.step() is not None and len([p for p in cluster.pods(
        ns, f"ray.io/cluster={cluster_name},ray.io/node-type=worker") if p.status.phase == "Running"]) == 2,
        timeout=60, what="2 Running workers")
    sim.step()   # the simulator learns the attempt's workers
    worker = cluster.pods(ns, f"ray.io/cluster={cluster_name},ray.io/node-type=worker")[0]
    node = worker.spec.node_name
    try:
        # A spot interruption as the interruption handlers (Karpenter, AWS Node Termination Handler) play it:
        # the node's pods are evicted through the Eviction API, then the cloud deletes the reclaimed VM's Node.
        cluster.core.create_namespaced_pod_eviction(worker.metadata.name, ns, {
            "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": worker.metadata.name,
                                                                        "namespace": ns}})
        cluster.core.delete_node(node)
        # The pool has no capacity left for now (spot capacity often goes with the interruption): the retry's
        # new workers wait, and the status says so, until the pool is opened again below.
        _cordon(cluster, "l4", True)
        preempted = wait_for(watch(lambda o: condition(o, "Ready").get("reason") == "Preempted"), timeout=150,
                             what="Preempted")
        assert phase(preempted) == "Running" and condition(preempted, "Reconciling")["status"] == "True"
        assert condition(preempted, "Stalled")["status"] == "False"
        message = condition(preempted, "Ready")["message"]
        assert worker.metadata.name in message and "0 of 1 retries used" in message, (message, seen)
        resuming = wait_for(watch(lambda o: condition(o, "Ready").get("reason") == "Resuming"
                                  and "waits for a node" in condition(o, "Ready")["message"]), timeout=90,
                            what="Resuming while the pool has no free node")
        assert resuming["status"]["retries"] == {"used": 1, "limit": 1}
        assert "resumes from the last complete checkpoint" in condition(resuming, "Ready")["message"]
        # What the retried driver reads: resume from the run folder this very resource marked as its own.
        job = json.loads(cluster.config_map(ns, "spot-ft-config").data["job.json"])
        assert (job["resume"], job["uid"]) == ("auto", resuming["metadata"]["uid"])
        # KubeRay's own retry: a new Ray cluster for the second attempt, which the simulator then finishes.
        _cordon(cluster, "l4", False)
        again = wait_for(watch(lambda o: o["status"].get("rayClusterName") not in (None, cluster_name)
                               and condition(o, "Ready").get("reason") == "JobRunning"), timeout=120,
                         what="the second attempt running")
        assert "attempt 2, 1 of 1 retries used" in condition(again, "Ready")["message"]
        sim.run_seconds = 0
        done = wait_for(watch(lambda o: phase(o) in ("Succeeded", "Failed")), timeout=90, what="the end")
        assert phase(done) == "Succeeded", done["status"]
        assert done["status"]["retries"] == {"used": 1, "limit": 1}
        reasons = [reason for _, reason in seen]
        assert "Failed" not in [p for p, _ in seen] and "PayloadFailed" not in reasons, seen
        assert reasons.index("Preempted") < reasons.index("Resuming") < len(reasons) - 1, seen
    finally:
        _cordon(cluster, "l4", False)
        register_pools(plane, plane.pools)   # the pool gets its node back for the tests that follow


def _cordon(cluster, pool: str, unschedulable: bool) -> None:
    for node in cluster.core.list_node(label_selector=f"llmops.dev/pool={pool}").items:
        cluster.core.patch_node(node.metadata.name, {"spec": {"unschedulable": unschedulable}})
