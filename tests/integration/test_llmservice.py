"""LLMService on the real plane: RayService and its cluster, adapters from FineTunes, gates, in-place changes,
scaling to zero and back."""

from __future__ import annotations

import pytest
import yaml

from integration.harness import condition, phase, wait_for
from llmops.dev.simulator import Plan, ServeApp, Simulator
from manifests import batchinference, finetune, llmservice

pytestmark = pytest.mark.integration


@pytest.fixture()
def simulator(plane, ns):
    return Simulator(plane.kubeconfig, run_seconds=0, namespace=ns)


def _service(cluster, ns, name="svc"):
    return cluster.ray("rayservices", ns, f"{name}-llm")


def _adapter(obj, name):
    return next((a for a in (obj or {}).get("status", {}).get("adapters") or [] if a["name"] == name), {})


def _finish(simulator, cluster, ns, kind, name, job, plan=None):
    if plan:
        simulator.plans[(ns, job)] = plan
    wait_for(lambda: (lambda o: o if phase(o) == "Running" else None)(cluster.get(kind, ns, name)), timeout=150,
             what=f"{kind} {name} Running", show=lambda: (cluster.get(kind, ns, name) or {}).get("status"))
    wait_for(lambda: (simulator.step() or True) and phase(cluster.get(kind, ns, name)) in ("Succeeded", "Failed"),
             timeout=90, what=f"{kind} {name} to finish")


def test_rayservice_and_its_cluster_on_the_pool(cluster, operator, ns):
    cluster.create(llmservice("svc"), ns)
    service = wait_for(lambda: _service(cluster, ns), what="the RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    config = app["args"]["llm_configs"][0]
    assert config["model_loading_config"] == {"model_id": "ft-model", "model_source": "Qwen/Qwen2.5-7B-Instruct"}
    assert config["accelerator_type"] == "L4"
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}

    def running_pods():
        pods = [p for p in cluster.pods(ns, "ray.io/is-ray-node=yes") if p.status.phase == "Running"]
        return pods if len(pods) >= 2 else None
    pods = wait_for(running_pods, timeout=90, what="the RayService's cluster to run")
    workers = [p for p in pods if p.metadata.labels["ray.io/node-type"] == "worker"]
    assert workers and all(p.spec.node_name.startswith("l4-") for p in workers)
    svc = wait_for(lambda: cluster.get("LLMService", ns, "svc").get("status", {}).get("endpoint") and
                   cluster.get("LLMService", ns, "svc"), what="status.endpoint")
    assert svc["status"]["endpoint"] == f"http://svc-llm-serve-svc.{ns}.svc.cluster.local:8000/v1"
    assert svc["status"]["models"] == ["ft-model"]
    assert svc["status"]["rayServiceName"] == "svc-llm"


def test_finetune_chain_and_gate(cluster, operator, ns, simulator):
    cluster.create(finetune("viggo"), ns)
    cluster.create(batchinference("viggo-eval", fine_tune="viggo"), ns)
    cluster.create(llmservice("svc", adapters=[{
        "name": "viggo", "fineTuneRef": {"name": "viggo"},
        "gate": {"batchInferenceRef": {"name": "viggo-eval"}, "metric": "exactMatch", "minimum": 0.6}}]), ns)

    def status():   # all three, shown when a wait times out
        return {kind: (cluster.get(kind, ns, name) or {}).get("status") for kind, name in (
            ("FineTune", "viggo"), ("BatchInference", "viggo-eval"), ("LLMService", "svc"))}

    wait_for(lambda: _adapter(cluster.get("LLMService", ns, "svc"), "viggo").get("state") == "WaitingForFineTune",
             timeout=120, what="WaitingForFineTune", show=status)
    _finish(simulator, cluster, ns, "FineTune", "viggo", "viggo-ft")
    wait_for(lambda: _adapter(cluster.get("LLMService", ns, "svc"), "viggo").get("state") == "WaitingForEvaluation",
             timeout=120, what="WaitingForEvaluation", show=status)
    _finish(simulator, cluster, ns, "BatchInference", "viggo-eval", "viggo-eval-bi")
    svc = wait_for(lambda: (lambda o: o if _adapter(o, "viggo").get("state") == "Serving" else None)(
        cluster.get("LLMService", ns, "svc")), timeout=120, what="the adapter to be served", show=status)
    assert "ft-model:viggo" in svc["status"]["models"]
    serve = yaml.safe_load(_service(cluster, ns)["spec"]["serveConfigV2"])
    lora = serve["applications"][0]["args"]["llm_configs"][0]["lora_config"]
    assert lora["dynamic_lora_loading_path"] == "s3://bucket/adapters"
    engine = serve["applications"][0]["args"]["llm_configs"][0]["engine_kwargs"]
    assert engine["max_loras"] == lora["max_num_adapters_per_replica"]


def test_gate_not_met_says_measured_value(cluster, operator, ns, simulator):
    cluster.create(batchinference("weak"), ns)
    cluster.create(llmservice("gated", adapters=[{
        "name": "weak", "uri": "s3://bucket/adapters/weak",
        "gate": {"batchInferenceRef": {"name": "weak"}, "metric": "exactMatch", "minimum": 0.9}}]), ns)
    _finish(simulator, cluster, ns, "BatchInference", "weak", "weak-bi",
            Plan(metrics={"rows": 100, "exactMatch": 0.42, "functionNameAccuracy": 0.9, "attributeF1": 0.8}))
    svc = wait_for(lambda: (lambda o: o if _adapter(o, "weak").get("state") == "GateNotMet" else None)(
        cluster.get("LLMService", ns, "gated")), what="GateNotMet")
    assert "0.42" in _adapter(svc, "weak")["message"]
    assert svc["status"]["models"] == ["ft-model"]


def test_adding_an_adapter_keeps_the_cluster(cluster, operator, ns):
    """Adapters load dynamically from the common parent: adding one never touches rayClusterConfig, so KubeRay
    keeps the running cluster (no upgrade, no new RayCluster)."""
    cluster.create(llmservice("grow", adapters=[{"name": "a", "uri": "s3://bucket/adapters/a"}]), ns)
    before = wait_for(lambda: _service(cluster, ns, "grow"), what="the RayService")
    wait_for(lambda: cluster.ray_list("rayclusters", ns), timeout=60, what="its RayCluster")
    clusters_before = {c["metadata"]["name"] for c in cluster.ray_list("rayclusters", ns)}
    adapters = cluster.get("LLMService", ns, "grow")["spec"]["adapters"]
    cluster.patch("LLMService", ns, "grow", {"spec": {"adapters": adapters + [
        {"name": "b", "uri": "s3://bucket/adapters/b"}]}})
    wait_for(lambda: "ft-model:b" in (cluster.get("LLMService", ns, "grow")["status"].get("models") or []),
             what="ft-model:b to be published")
    after = _service(cluster, ns, "grow")
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    lora = yaml.safe_load(after["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"][0]["lora_config"]
    assert lora["dynamic_lora_loading_path"] == "s3://bucket/adapters"
    assert {c["metadata"]["name"] for c in cluster.ray_list("rayclusters", ns)} == clusters_before


def test_engine_change_rolls_out_a_new_cluster(cluster, operator, ns):
    """A model/engine/resources change alters rayClusterConfig (its fingerprint), so KubeRay's upgradeStrategy
    (NewCluster) applies; an adapter change does not (test above)."""
    cluster.create(llmservice("upgrade"), ns)
    before = wait_for(lambda: _service(cluster, ns, "upgrade"), what="the RayService")
    cluster.patch("LLMService", ns, "upgrade", {"spec": {"engine": {"maxModelLen": 8192}}})
    after = wait_for(lambda: (lambda s: s if s["spec"]["rayClusterConfig"] != before["spec"]["rayClusterConfig"]
                              else None)(_service(cluster, ns, "upgrade")), what="a new rayClusterConfig")
    assert "max_model_len: 8192" in after["spec"]["serveConfigV2"]


def test_unsupported_adapter_location_is_reported(cluster, operator, ns):
    cluster.create(llmservice("pvc", adapters=[{"name": "local", "uri": "pvc://models/adapters/local"}]), ns)
    svc = wait_for(lambda: (lambda o: o if _adapter(o, "local").get("state") == "Unsupported" else None)(
        cluster.get("LLMService", ns, "pvc")), what="Unsupported")
    message = _adapter(svc, "local")["message"]
    assert "s3://" in message and "PersistentVolumeClaim" in message
    assert "local" in condition(svc, "Reconciling")["message"] or "local" in svc["status"]["message"]


def test_suspend_removes_the_rayservice_and_a_deleted_one_comes_back(cluster, operator, ns):
    """A service is meant to keep serving: a RayService deleted by someone else is re-created (unlike a job's
    RayJob). Suspended removes it, and reads Suspended=True with no Ready (kstatus: Current)."""
    cluster.create(llmservice("keep"), ns)
    first = wait_for(lambda: _service(cluster, ns, "keep"), what="the RayService")
    cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayservices", "keep-llm")
    wait_for(lambda: (lambda s: s if s and s["metadata"]["uid"] != first["metadata"]["uid"] else None)(
        _service(cluster, ns, "keep")), timeout=60, what="a new RayService")
    cluster.patch("LLMService", ns, "keep", {"spec": {"suspend": True}})
    svc = wait_for(lambda: (lambda o: o if phase(o) == "Suspended" else None)(cluster.get("LLMService", ns, "keep")),
                   what="Suspended")
    assert condition(svc, "Suspended")["status"] == "True" and not condition(svc, "Ready")
    wait_for(lambda: _service(cluster, ns, "keep") is None, timeout=60, what="the RayService to go")


def _reason(obj):
    return condition(obj, "Ready").get("reason")


def test_scale_to_zero_and_back(cluster, operator, ns, simulator):
    """minReplicas 0 on the real KubeRay: the RayService is accepted and its cluster starts with a head (and the
    autoscaler beside it) and no GPU worker. With the Serve application RUNNING and no replica, the service
    reads Ready=True ScaledToZero; a request makes Serve scale up and the autoscaler ask for a worker, which
    KubeRay creates on the GPU pool (ScalingUpFromZero until the replica is up); once idle, the autoscaler has
    KubeRay remove the worker and the service reads ScaledToZero again. SIMULATED: what the Ray dashboard reports
    (Serve's statuses) and the Ray autoscaler's requests; everything else is the real plane."""
    doc = llmservice("zero")
    doc["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 2, "scaleToZeroDelaySeconds": 120}
    cluster.create(doc, ns)
    service = wait_for(lambda: _service(cluster, ns, "zero"), what="the RayService")
    scaling = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"][0][
        "deployment_config"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["downscale_to_zero_delay_s"]) == (0, 120)

    ray_cluster = wait_for(lambda: next(iter(cluster.ray_list("rayclusters", ns)), None), what="its RayCluster")
    [group] = ray_cluster["spec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (0, 0, 2)
    assert ray_cluster["spec"]["enableInTreeAutoscaling"] is True
    heads = wait_for(lambda: [p for p in cluster.pods(ns, "ray.io/node-type=head") if p.status.phase == "Running"],
                     timeout=90, what="the head pod to run")
    assert "autoscaler" in [c.name for c in heads[0].spec.containers]   # KubeRay took in-tree autoscaling

    def workers():
        return [p for p in cluster.pods(ns, "ray.io/node-type=worker") if not p.metadata.deletion_timestamp]

    def reads(reason):
        simulator.step()
        obj = cluster.get("LLMService", ns, "zero")
        return obj if _reason(obj) == reason else None

    model, ingress = "LLMServer:ft-model", "OpenAiIngress"
    simulator.services[(ns, "zero-llm")] = ServeApp({model: "HEALTHY", ingress: "HEALTHY"})
    svc = wait_for(lambda: reads("ScaledToZero"), timeout=90, what="ScaledToZero")
    assert condition(svc, "Ready")["status"] == "True" and condition(svc, "Reconciling")["status"] == "False"
    assert "the first request starts one and waits for it" in condition(svc, "Ready")["message"]
    assert "after 120s without a request" in condition(svc, "Ready")["message"]
    assert svc["status"]["phase"] == "Ready" and workers() == []

    # A request arrives: Serve scales the ingress and the model up from zero and the autoscaler asks for a worker.
    simulator.services[(ns, "zero-llm")] = ServeApp({model: "UPSCALING", ingress: "UPSCALING"})
    svc = wait_for(lambda: reads("ScalingUpFromZero"), timeout=60, what="ScalingUpFromZero")
    assert condition(svc, "Ready")["status"] == "True" and condition(svc, "Reconciling")["status"] == "False"
    simulator.autoscale(ns, ray_cluster["metadata"]["name"], replicas=1)
    worker = wait_for(lambda: [p for p in workers() if p.status.phase == "Running"], timeout=90,
                      what="KubeRay to start a GPU worker")[0]
    assert worker.spec.node_name.startswith("l4-")
    wait_for(lambda: (lambda o: o if o and "the model replica is starting" in condition(o, "Ready")["message"]
                            else None)(reads("ScalingUpFromZero")), timeout=60, what="the model replica starting")
    simulator.services[(ns, "zero-llm")] = ServeApp({model: "HEALTHY", ingress: "HEALTHY"})
    wait_for(lambda: reads("Serving"), timeout=60, what="Serving once the replica is up")

    # Idle: Serve stops the replica, and the autoscaler has KubeRay remove the idle worker.
    simulator.autoscale(ns, ray_cluster["metadata"]["name"], replicas=0, delete=[worker.metadata.name])
    wait_for(lambda: workers() == [], timeout=90, what="KubeRay to remove the worker")
    wait_for(lambda: reads("ScaledToZero"), timeout=60, what="ScaledToZero again")
