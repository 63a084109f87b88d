"""LLMService on the real plane: RayService and its cluster, adapters from FineTunes, gates, in-place changes."""

from __future__ import annotations

import pytest
import yaml

from integration.harness import condition, phase, wait_for
from llmops.dev.simulator import Plan, Simulator
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
    wait_for(lambda: phase(cluster.get(kind, ns, name)) == "Running", timeout=150, what=f"{kind} {name} Running")
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
    wait_for(lambda: _adapter(cluster.get("LLMService", ns, "svc"), "viggo").get("state") == "WaitingForFineTune",
             timeout=120, what="WaitingForFineTune")
    _finish(simulator, cluster, ns, "FineTune", "viggo", "viggo-ft")
    wait_for(lambda: _adapter(cluster.get("LLMService", ns, "svc"), "viggo").get("state") == "WaitingForEvaluation",
             timeout=120, what="WaitingForEvaluation")
    _finish(simulator, cluster, ns, "BatchInference", "viggo-eval", "viggo-eval-bi")
    svc = wait_for(lambda: (lambda o: o if _adapter(o, "viggo").get("state") == "Serving" else None)(
        cluster.get("LLMService", ns, "svc")), timeout=120, what="the adapter to be served")
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
