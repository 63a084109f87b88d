"""LLMService with autoscaling.minReplicas 0: the verdicts for a service with no replica, one scaling up from
zero, and one whose scale-up cannot start; then the same through the real reconciler, with the pods read by the
operator's own pod index."""

from __future__ import annotations

import datetime

import pytest

from llmops.handlers.caches import pod_entries
from llmops.status import PodProblem, ZeroScaling, conditions_for, service_verdict, zero_scaling
from unit.test_engine import key_of, loop, run, setup  # noqa: F401  (loop: the engine's event loop fixture)

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
SINCE = "2026-01-01T00:00:00Z"   # T0
LONG_AGO = "2025-12-31T00:00:00Z"


def rayservice(*deployments: str, ready: str = "True") -> dict:
    """A RayService as KubeRay writes it once the dashboard reports the app: `deployments` are the Serve
    deployment statuses (the model's, then the ingress's)."""
    names = ["LLMServer:ft-model", "OpenAiIngress"]
    return {"status": {
        "conditions": [{"type": "Ready", "status": ready, "reason": "NonZeroServeEndpoints"},
                       {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster"}],
        "activeServiceStatus": {"applicationStatuses": {"llm": {"status": "RUNNING", "serveDeploymentStatuses": {
            name: {"status": status} for name, status in zip(names, deployments)}}}}}}


def zero(running: int = 0, starting: tuple[str, ...] = (), previous: str = "") -> ZeroScaling:
    return ZeroScaling(600, running, starting, previous)


def verdict(service, scaling, problems=()):
    return service_verdict(service, "", list(problems), "NewCluster", T0 + 60, scaling)


@pytest.mark.parametrize("deployments, scaling, reason", [
    (("HEALTHY", "HEALTHY"), zero(), "ScaledToZero"),
    (("UPSCALING", "HEALTHY"), zero(), "ScalingUpFromZero"),             # a request came: no pod yet
    (("HEALTHY", "UPSCALING"), zero(), "ScalingUpFromZero"),             # the ingress comes back first
    (("UPSCALING", "HEALTHY"), zero(starting=("w-1",)), "ScalingUpFromZero"),
    (("HEALTHY", "HEALTHY"), zero(starting=("w-1",)), "ScalingUpFromZero"),   # the autoscaler already added it
    (("UPSCALING", "HEALTHY"), zero(running=1, previous="ScalingUpFromZero"), "ScalingUpFromZero"),  # model loads
    (("HEALTHY", "HEALTHY"), zero(running=1, previous="ScalingUpFromZero"), "Serving"),   # the replica is up
    (("UPSCALING", "HEALTHY"), zero(running=1, previous="Serving"), "Serving"),   # 1 -> 2 is not from zero
    (("HEALTHY", "HEALTHY"), zero(running=1), "Serving"),   # idle, its worker not removed yet
])
def test_a_service_that_may_scale_to_zero_stays_ready(deployments, scaling, reason):
    found = verdict(rayservice(*deployments), scaling)
    assert (found.phase, found.state, found.reason) == ("Ready", "ready", reason)


def test_without_min_replicas_zero_no_worker_is_still_serving():
    """minReplicas >= 1 never reads ScaledToZero, whatever the pods show (zero is None)."""
    assert verdict(rayservice("HEALTHY", "HEALTHY"), None).reason == "Serving"


def test_messages_say_what_the_first_request_does():
    scaled = verdict(rayservice("HEALTHY", "HEALTHY"), zero())
    assert "scaled to zero" in scaled.message and "after 600s without a request" in scaled.message
    assert "the first request starts one and waits for it" in scaled.message
    upscaling = verdict(rayservice("UPSCALING", "HEALTHY"), zero(starting=("svc-gpu-worker-x",)))
    assert "scaling up from zero" in upscaling.message and "svc-gpu-worker-x is starting" in upscaling.message
    loading = verdict(rayservice("UPSCALING", "HEALTHY"), zero(running=1, previous="ScalingUpFromZero"))
    assert "the model replica is starting" in loading.message


def test_kstatus_reads_both_as_current():
    """Ready=True, Reconciling=False, Stalled=False: Current for kstatus, Healthy for Argo CD."""
    for found in (verdict(rayservice("HEALTHY", "HEALTHY"), zero()), verdict(rayservice("UPSCALING"), zero())):
        conditions = {c["type"]: c["status"] for c in conditions_for(found, 1, None, SINCE)}
        assert conditions == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}


def test_a_scale_up_waits_for_a_node_then_stalls():
    pending = [PodProblem("Unschedulable", "0/3 nodes: Insufficient nvidia.com/gpu.", "w-1", SINCE)]
    waiting = verdict(rayservice("UPSCALING"), zero(starting=("w-1",)), pending)
    assert (waiting.state, waiting.reason) == ("ready", "ScalingUpFromZero")
    assert "Insufficient nvidia.com/gpu" in waiting.message and "then this stalls" in waiting.message
    assert waiting.recheck_after is not None and waiting.recheck_after > 0   # decide again when the grace ends
    stuck = [PodProblem("Unschedulable", "0/3 nodes: Insufficient nvidia.com/gpu.", "w-1", LONG_AGO)]
    stalled = verdict(rayservice("UPSCALING"), zero(starting=("w-1",)), stuck)
    assert (stalled.state, stalled.reason) == ("stalled", "Unschedulable")
    assert stalled.message.startswith("scaling up from zero: pod w-1 cannot be scheduled")


def test_a_scale_up_whose_image_cannot_be_pulled_stalls_at_once():
    problems = [PodProblem("ImagePullBackOff", "pull access denied", "w-1")]
    found = verdict(rayservice("UPSCALING"), zero(starting=("w-1",)), problems)
    assert (found.state, found.reason) == ("stalled", "ImagePullFailed")


def test_failures_and_upgrades_come_first():
    failed = rayservice("HEALTHY")
    failed["status"]["activeServiceStatus"]["applicationStatuses"]["llm"].update(status="DEPLOY_FAILED",
                                                                                  message="bad model")
    assert verdict(failed, zero()).reason == "ServeApplicationFailed"
    upgrading = rayservice("HEALTHY")
    upgrading["status"]["conditions"][1]["status"] = "True"
    assert verdict(upgrading, zero()).reason == "UpgradeInProgress"
    assert verdict(rayservice("HEALTHY", ready="False"), zero()).state == "progressing"


def pod(name: str, node_type: str, phase: str, deleting: bool = False) -> dict:
    meta = {"name": name, "namespace": "default", "labels": {
        "llmops.dev/owner-uid": "uid-svc", "ray.io/cluster": "svc-llm-abcde", "ray.io/node-type": node_type}}
    if deleting:
        meta["deletionTimestamp"] = SINCE
    return {"kind": "Pod", "metadata": meta, "status": {"phase": phase}}


def test_worker_pods_are_counted_from_the_pod_index():
    """The index keeps what the count needs (node type, deletion) and nothing more of the pod."""
    pods = [pod("head", "head", "Running"), pod("w-1", "worker", "Running"), pod("w-2", "worker", "Pending"),
            pod("w-3", "worker", "Running", deleting=True)]
    indexed = [entry for p in pods for entry in pod_entries(p).values()]
    assert zero_scaling(indexed, 300, "ScaledToZero") == ZeroScaling(300, 1, ("w-2",), "ScaledToZero")


def llmservice_zero(**autoscaling) -> dict:
    return {"apiVersion": "llmops.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "svc", "namespace": "default"},
            "spec": {"modelId": "ft-model", "model": {"source": "Qwen/Qwen2.5-7B-Instruct"},
                     "autoscaling": {"minReplicas": 0, "maxReplicas": 2, **autoscaling}}}


def test_the_reconciler_reads_scaled_to_zero_then_a_cold_start():
    doc = llmservice_zero(scaleToZeroDelaySeconds=300)
    engine, kube, watches = setup(doc)
    run(engine.reconcile(key_of(doc)))
    service = kube.objects[("RayService", "default", "svc-llm")]
    service.update(rayservice("HEALTHY", "HEALTHY"))
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    status = kube.objects[key_of(doc)]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], ready["status"], ready["reason"]) == ("Ready", "True", "ScaledToZero")
    assert "after 300s without a request" in ready["message"]

    service.update(rayservice("UPSCALING", "HEALTHY"))   # a request arrived; the autoscaler adds a worker
    kube.add(pod("svc-llm-gpu-worker-1", "worker", "Pending"))
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    ready = next(c for c in kube.objects[key_of(doc)]["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ScalingUpFromZero")
    assert "svc-llm-gpu-worker-1 is starting" in ready["message"]
