"""The model cache on the real plane: the claim and the download Job the operator creates, the status while it
downloads, the Ray pods that mount the claim read-only once the Job completed, a failed download, and the
garbage collector taking it all with its owner. The simulator plays the download (its reports, and the volume a
storage provisioner would bind); the Job, its pod, the Job controller and kwok's completion are real."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes import client

from integration.harness import condition, phase, wait_for
from llmops.dev.simulator import Plan, Simulator
from manifests import batchinference, finetune, llmservice

pytestmark = pytest.mark.integration

CACHE = {"size": "20Gi"}


@pytest.fixture()
def simulator(plane, ns):
    return Simulator(plane.kubeconfig, run_seconds=0, namespace=ns)


@pytest.fixture()
def batch(cluster):
    return client.BatchV1Api(cluster.api_client)


def _reason(obj):
    return condition(obj, "Reconciling").get("reason")


def _cache_mount(pod_spec, claim):
    volume = next(v for v in pod_spec["volumes"] if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim)
    mount = next(m for c in pod_spec["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"])
    return volume, mount


def test_llmservice_serves_from_its_cache_once_downloaded(cluster, operator, ns, simulator, batch):
    doc = llmservice("svc")
    doc["spec"]["model"]["cache"] = CACHE
    doc["spec"]["secrets"] = {"huggingFaceToken": {"name": "hf", "key": "token"}}
    cluster.create(doc, ns)

    svc = wait_for(lambda: (lambda o: o if _reason(o) == "CachingModel" else None)(cluster.get("LLMService", ns, "svc")),
                   what="Reconciling: CachingModel")
    assert phase(svc) == "Pending" and svc["status"]["modelCache"]["state"] == "Downloading"
    job = wait_for(lambda: batch.list_namespaced_job(ns).items, what="the download Job")[0]
    assert job.metadata.name == "svc-llm-cache" and job.metadata.owner_references[0].kind == "LLMService"
    container = job.spec.template.spec.containers[0]
    token = next(e for e in container.env if e.name == "HF_TOKEN")
    assert token.value is None and token.value_from.secret_key_ref.name == "hf"
    claim = cluster.core.read_namespaced_persistent_volume_claim("svc-llm-cache", ns)
    assert claim.spec.resources.requests["storage"] == "20Gi" and claim.status.phase == "Pending"
    assert cluster.ray("rayservices", ns, "svc-llm") is None   # no replica before the model is there

    simulator.step()   # the download's first report: half the bytes
    svc = wait_for(lambda: (lambda o: o if (o["status"].get("modelCache") or {}).get("bytesDone") else None)(
        cluster.get("LLMService", ns, "svc")), what="the bytes downloaded in status")
    cache = svc["status"]["modelCache"]
    assert cache["bytesTotal"] > cache["bytesDone"] > 0 and cache["claimName"] == "svc-llm-cache"
    assert "GiB of" in condition(svc, "Reconciling")["message"] and "spec.model.cache" in svc["status"]["message"]

    service = wait_for(lambda: (simulator.step() or True) and cluster.ray("rayservices", ns, "svc-llm"),
                       timeout=120, what="the RayService once the Job completed")
    done = batch.read_namespaced_job("svc-llm-cache", ns)
    assert any(c.type == "Complete" and c.status == "True" for c in done.status.conditions)
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    volume, mount = _cache_mount(worker, "svc-llm-cache")
    assert volume["persistentVolumeClaim"]["readOnly"] is True and mount["readOnly"] is True
    config = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"][0]
    assert config["model_loading_config"]["model_source"] == "/mnt/llmops/pvc/svc-llm-cache/Qwen2.5-7B-Instruct"
    svc = wait_for(lambda: (lambda o: o if o["status"]["modelCache"]["state"] == "Cached" else None)(
        cluster.get("LLMService", ns, "svc")), what="modelCache Cached")
    assert svc["status"]["modelCache"]["bytesDone"] == svc["status"]["modelCache"]["bytesTotal"]

    def worker_running():
        pods = [p for p in cluster.pods(ns, "ray.io/node-type=worker") if p.status.phase == "Running"]
        return pods or None
    pod = wait_for(worker_running, timeout=90, what="a replica's worker pod to run with the claim")[0]
    assert any(v.persistent_volume_claim and v.persistent_volume_claim.claim_name == "svc-llm-cache"
               for v in pod.spec.volumes)

    cluster.delete("LLMService", ns, "svc")   # everything of the cache goes with its owner
    wait_for(lambda: not batch.list_namespaced_job(ns).items, timeout=90, what="the Job to be collected")
    wait_for(lambda: all(c.metadata.deletion_timestamp for c in
                         cluster.core.list_namespaced_persistent_volume_claim(ns).items),
             timeout=90, what="the claim to be deleted")


def test_finetune_trains_from_its_cache(cluster, operator, ns, simulator):
    doc = finetune("tune")
    doc["spec"]["baseModel"]["cache"] = CACHE
    cluster.create(doc, ns)
    job = wait_for(lambda: (simulator.step() or True) and cluster.ray("rayjobs", ns, "tune-ft"), timeout=120,
                   what="the RayJob once the model is cached")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    _, mount = _cache_mount(head, "tune-ft-cache")
    assert mount["readOnly"] is True
    config = yaml.safe_load(wait_for(lambda: cluster.config_map(ns, "tune-ft-config"),
                                     what="the job ConfigMap").data["train.yaml"])
    assert config["model_name_or_path"] == "/mnt/llmops/pvc/tune-ft-cache/Qwen2.5-7B-Instruct"
    # The simulator plays the Ray job once its pods run (they mount the bound claim); it finishes at once.
    ft = wait_for(lambda: (simulator.step() or True) and (lambda o: o if phase(o) == "Succeeded" else None)(
        cluster.get("FineTune", ns, "tune")), timeout=150, what="FineTune Succeeded",
        show=lambda: cluster.get("FineTune", ns, "tune").get("status"))
    assert ft["status"]["modelCache"]["state"] == "Cached"


def test_batchinference_reads_its_cache(cluster, operator, ns, simulator):
    doc = batchinference("eval")
    doc["spec"]["model"]["cache"] = CACHE
    cluster.create(doc, ns)
    wait_for(lambda: (simulator.step() or True) and cluster.ray("rayjobs", ns, "eval-bi"), timeout=120,
             what="the RayJob once the model is cached")
    job_json = json.loads(wait_for(lambda: cluster.config_map(ns, "eval-bi-config"),
                                   what="the job ConfigMap").data["job.json"])
    assert job_json["model"]["source"] == "pvc://eval-bi-cache/Qwen2.5-7B-Instruct"
    bi = wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("modelCache", {}).get("state") == "Cached"
                           else None)(cluster.get("BatchInference", ns, "eval")), what="modelCache Cached")
    assert bi["status"]["modelSource"] == "Qwen/Qwen2.5-7B-Instruct"   # what the user named, not the claim


def test_a_failed_download_stalls_naming_the_field(cluster, operator, ns, simulator):
    doc = finetune("bad")
    doc["spec"]["baseModel"]["cache"] = CACHE
    simulator.downloads[(ns, "bad-ft-cache")] = Plan("Failed", "RepositoryNotFoundError: 401 Client Error")
    cluster.create(doc, ns)
    ft = wait_for(lambda: (simulator.step() or True) and (
        lambda o: o if condition(o, "Stalled").get("status") == "True" else None)(cluster.get("FineTune", ns, "bad")),
        timeout=90, what="Stalled")
    stalled = condition(ft, "Stalled")
    assert stalled["reason"] == "ModelCacheFailed" and phase(ft) == "Failed"
    assert "spec.baseModel.cache" in stalled["message"] and "RepositoryNotFoundError" in stalled["message"]
    assert ft["status"]["modelCache"]["state"] == "Failed"
    assert cluster.ray("rayjobs", ns, "bad-ft") is None
