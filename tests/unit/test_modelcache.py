"""The model cache: its children (claim, report channel, download Job), the Ray pods that mount it read-only and
load from it, where a download stands in status, and the engine holding the Ray work back until it is cached."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from llmops.api.common import ModelCache, ModelCacheStatus
from llmops.builders import batchinference, finetune, llmservice, modelcache
from llmops.builders.common import CACHE_ROLE, ROLE_LABEL, BuildContext, Owner, load_payloads
from llmops.builders.serving import resolve_adapters
from llmops.api.batchinference import BatchInferenceSpec
from llmops.api.finetune import FineTuneSpec
from llmops.api.llmservice import LLMServiceSpec
from llmops.decide.modelcache import decide
from llmops.settings import Settings
from llmops.status import REPORT_GRACE_SECONDS
from manifests import batchinference as bi_manifest, finetune as ft_manifest, llmservice as llms_manifest
from unit.test_engine import key_of, loop, run, setup  # noqa: F401 (loop: one event loop per test)

CTX = BuildContext(settings=Settings(), payloads=load_payloads())
CACHE = {"size": "20Gi", "storageClassName": "filestore"}


def owner(kind: str, name: str) -> Owner:
    return Owner("llmops.dev/v1alpha1", kind, name, "ml", f"uid-{name}")


def by_kind(children: list[dict], kind: str) -> list[dict]:
    return [c for c in children if c["kind"] == kind]


def worker_pod(cluster: dict) -> dict:
    return cluster["workerGroupSpecs"][0]["template"]["spec"]


def cache_mount(pod: dict, claim: str) -> tuple[dict, dict]:
    volume = next(v for v in pod["volumes"] if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim)
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    return volume, mount


# ---- builders -----------------------------------------------------------------------------------------------
def test_finetune_workers_load_the_model_from_the_claim_read_only():
    doc = ft_manifest("tune")
    doc["spec"]["baseModel"].update(cache=CACHE, revision="main")
    spec = FineTuneSpec.model_validate(doc["spec"])
    children = finetune.build(owner("FineTune", "tune"), spec, CTX)
    job = by_kind(children, "RayJob")[0]
    for pod in (worker_pod(job["spec"]["rayClusterSpec"]),
                job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]):
        volume, mount = cache_mount(pod, "tune-ft-cache")
        assert volume["persistentVolumeClaim"]["readOnly"] is True and mount["readOnly"] is True
        assert mount["mountPath"] == "/mnt/llmops/pvc/tune-ft-cache"
    config_map = next(c for c in children if c["metadata"]["name"] == "tune-ft-config")
    train = yaml.safe_load(config_map["data"]["train.yaml"])
    assert train["model_name_or_path"] == "/mnt/llmops/pvc/tune-ft-cache/Qwen2.5-7B-Instruct"
    assert "model_revision" not in train   # the download fetched that revision
    plain = finetune.build(owner("FineTune", "tune"), FineTuneSpec.model_validate(ft_manifest("tune")["spec"]), CTX)
    uncached = yaml.safe_load(next(c for c in plain if c["metadata"]["name"] == "tune-ft-config")["data"]["train.yaml"])
    assert train["per_device_train_batch_size"] == uncached["per_device_train_batch_size"]   # sized alike
    assert not any(c["kind"] in ("Job", "PersistentVolumeClaim") for c in children)


def test_llmservice_replicas_serve_the_cached_model_under_its_own_id():
    doc = llms_manifest("svc")
    doc["spec"]["model"]["cache"] = {"size": "20Gi", "accessMode": "ReadOnlyMany"}
    spec = LLMServiceSpec.model_validate(doc["spec"])
    plan = resolve_adapters(spec, {}, {})
    service = by_kind(llmservice.build(owner("LLMService", "svc"), spec, CTX, plan), "RayService")[0]
    volume, mount = cache_mount(worker_pod(service["spec"]["rayClusterConfig"]), "svc-llm-cache")
    assert volume["persistentVolumeClaim"]["readOnly"] is True and mount["readOnly"] is True
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    loading = config["applications"][0]["args"]["llm_configs"][0]["model_loading_config"]
    assert loading == {"model_id": "ft-model", "model_source": "/mnt/llmops/pvc/svc-llm-cache/Qwen2.5-7B-Instruct"}


def test_batchinference_caches_the_base_model_a_finetune_brings():
    doc = bi_manifest("eval", fine_tune="tune")
    doc["spec"]["model"]["cache"] = CACHE
    spec = BatchInferenceSpec.model_validate(doc["spec"])
    model = batchinference.ResolvedModel.of_finetune("Qwen/Qwen2.5-0.5B-Instruct", "s3://b/adapters/tune", 8)
    children = batchinference.build(owner("BatchInference", "eval"), spec, CTX, model)
    job_json = json.loads(next(c for c in children if c["metadata"]["name"] == "eval-bi-config")["data"]["job.json"])
    assert job_json["model"]["source"] == "pvc://eval-bi-cache/Qwen2.5-0.5B-Instruct"
    assert job_json["model"]["adapter"]["uri"] == "s3://b/adapters/tune"
    cached = batchinference.cached_model(owner("BatchInference", "eval"), spec, model)
    assert cached.source == "Qwen/Qwen2.5-0.5B-Instruct"


def test_cache_children_claim_report_channel_and_the_job_last():
    spec = FineTuneSpec.model_validate({**ft_manifest("tune")["spec"], "secrets": {
        "huggingFaceToken": {"name": "hf", "key": "token"}, "storage": {"name": "s3-creds"}}})
    model = modelcache.CachedModel("tune-ft-cache", "Qwen/Qwen2.5-7B-Instruct", "v2.0", ModelCache(**CACHE))
    children = modelcache.build(owner("FineTune", "tune"), model, spec, "ray:2.60", CTX)
    assert [c["kind"] for c in children] == ["PersistentVolumeClaim", "ConfigMap", "ConfigMap", "ServiceAccount",
                                             "Role", "RoleBinding", "Job"]
    claim = children[0]
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}},
                             "storageClassName": "filestore"}
    for child in children[:1] + children[2:]:   # all but the shared payload sources: collected with the owner
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-tune"
    report = children[2]
    assert report["metadata"]["labels"][ROLE_LABEL] == CACHE_ROLE and report["metadata"]["name"] == "tune-ft-cache"
    role = by_kind(children, "Role")[0]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["tune-ft-cache"],
                              "verbs": ["get", "patch"]}]
    job = children[-1]
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tune-ft-cache" and pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["image"] == "ray:2.60"
    assert container["command"] == ["python", "-m", "payloads.model_download", "--source",
                                    "Qwen/Qwen2.5-7B-Instruct", "--dest", "pvc://tune-ft-cache/Qwen2.5-7B-Instruct",
                                    "--revision", "v2.0"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert env["LLMOPS_RESULT_CONFIGMAP"]["value"] == "tune-ft-cache"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    writable = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
    assert writable == {"name": "model-cache", "mountPath": "/mnt/llmops/pvc/tune-ft-cache"}


def test_read_only_many_asks_read_write_once_for_the_one_writer():
    model = modelcache.CachedModel("c", "s3://b/m", None, ModelCache(size="20Gi", access_mode="ReadOnlyMany"))
    assert modelcache.claim(owner("LLMService", "s"), model, CTX)["spec"]["accessModes"] == ["ReadWriteOnce",
                                                                                           "ReadOnlyMany"]


def test_a_spec_own_service_account_downloads_too():
    spec = LLMServiceSpec.model_validate({**llms_manifest("s")["spec"], "serviceAccountName": "irsa"})
    model = modelcache.CachedModel("s-llm-cache", "s3://b/m", None, ModelCache(size="20Gi"))
    children = modelcache.build(owner("LLMService", "s"), model, spec, "img", CTX)
    assert not by_kind(children, "ServiceAccount")
    assert by_kind(children, "Job")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "irsa"
    assert by_kind(children, "RoleBinding")[0]["subjects"][0]["name"] == "irsa"


@pytest.mark.parametrize("kind, doc, field", [
    ("FineTune", lambda: ft_manifest(), ("baseModel",)),
    ("BatchInference", lambda: bi_manifest(), ("model",)),
    ("LLMService", lambda: llms_manifest(), ("model",)),
])
def test_a_pvc_source_with_a_cache_is_refused_naming_the_field(kind, doc, field):
    from llmops.api import KINDS
    spec = doc()["spec"]
    spec[field[0]].update(source="pvc://models/qwen", cache=CACHE)
    with pytest.raises(ValueError, match=rf"spec\.{field[0]}\.cache: a pvc:// source is read in place"):
        KINDS[kind].spec_model.model_validate(spec)


# ---- where the download stands ------------------------------------------------------------------------------
MODEL = modelcache.CachedModel("svc-llm-cache", "Qwen/Qwen2.5-7B-Instruct", None, ModelCache(size="20Gi"))
COMPLETE = {"status": {"conditions": [{"type": "Complete", "status": "True"}],
                       "completionTime": "2026-12-04T10:00:00Z"}}
FAILED = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "Job has reached the specified backoff limit"}]}}
RUNNING = {"state": "Running", "progress": json.dumps({"bytesDone": 2**30 * 3, "bytesTotal": 2**30 * 15, "files": 9})}
SUCCEEDED = {"state": "Succeeded",
             "progress": json.dumps({"bytesDone": 2**30 * 15, "bytesTotal": 2**30 * 15, "files": 9})}
NOW = 1796378400.0   # 2026-12-04T10:00:00Z


@pytest.mark.parametrize("job, report, now, state, reason, words", [
    (None, None, NOW, "progressing", "CachingModel", "starting the download Job"),
    ({"status": {}}, None, NOW, "progressing", "CachingModel", "listing the model's files"),
    ({"status": {}}, RUNNING, NOW, "progressing", "CachingModel", "3.0 GiB of 15.0 GiB"),
    ({"status": {}}, SUCCEEDED, NOW, "progressing", "CachingModel", "15.0 GiB of 15.0 GiB"),
    (COMPLETE, None, NOW + 1, "progressing", "CachingModel", "completed; reading its report"),
    (COMPLETE, None, NOW + REPORT_GRACE_SECONDS, "stalled", "ModelCacheFailed", "completed without reporting"),
    (FAILED, None, NOW, "stalled", "ModelCacheFailed", "Job has reached the specified backoff limit"),
    ({"status": {}}, {"state": "Failed", "message": "401 Unauthorized: check HF_TOKEN"}, NOW, "stalled",
     "ModelCacheFailed", "failed: 401 Unauthorized: check HF_TOKEN"),
])
def test_download_verdicts(job, report, now, state, reason, words):
    verdict, fields = decide(MODEL, "spec.model.cache", None, job, report, now)
    assert (verdict.state, verdict.reason) == (state, reason) and words in verdict.message
    assert "Qwen/Qwen2.5-7B-Instruct into PersistentVolumeClaim svc-llm-cache (spec.model.cache)" in verdict.message
    if state == "stalled":
        assert verdict.phase == "Failed" and verdict.fields.model_cache.state == "Failed"
    else:
        assert verdict.phase == "Pending" and verdict.fields.model_cache.state == "Downloading"


def test_a_changed_source_does_not_read_the_old_cache():
    recorded = ModelCacheStatus.model_validate({"state": "Cached", "claimName": "svc-llm-cache",
                                                "source": "Qwen/Qwen2.5-0.5B-Instruct", "jobName": "svc-llm-cache"})
    verdict, _ = decide(MODEL, "spec.model.cache", recorded, COMPLETE, SUCCEEDED, NOW)
    assert (verdict.state, verdict.reason) == ("stalled", "ModelCacheFailed")
    assert "holds Qwen/Qwen2.5-0.5B-Instruct, but the model is now Qwen/Qwen2.5-7B-Instruct" in verdict.message


def test_a_claim_that_never_binds_is_a_wait_then_stalled_with_the_fix():
    from llmops.status import PodProblem
    unbound = [PodProblem("Unschedulable", "0/9 nodes are available: pod has unbound immediate "
                          "PersistentVolumeClaims.", "svc-llm-cache-x7k2p", "2026-12-04T10:00:00Z")]
    waiting, _ = decide(MODEL, "spec.model.cache", None, {"status": {}}, None, NOW + 60, unbound)
    assert (waiting.state, waiting.reason) == ("progressing", "CachingModel")
    assert "unbound immediate PersistentVolumeClaims" in waiting.message
    stalled, _ = decide(MODEL, "spec.model.cache", None, {"status": {}}, None, NOW + 3600, unbound)
    assert (stalled.state, stalled.reason, stalled.phase) == ("stalled", "Unschedulable", "Pending")
    assert "spec.model.cache.storageClassName" in stalled.message and "ReadWriteMany" in stalled.message
    assert stalled.fields.model_cache.state == "Downloading"


def test_the_download_pod_is_not_a_ray_pod():
    from llmops.builders.common import DOWNLOAD_ROLE
    from llmops.handlers.caches import pod_entries, ray_pods
    spec = LLMServiceSpec.model_validate(llms_manifest("s")["spec"])
    model = modelcache.CachedModel("s-llm-cache", "s3://b/m", None, ModelCache(size="20Gi"))
    template = by_kind(modelcache.build(owner("LLMService", "s"), model, spec, "img", CTX), "Job")[0]["spec"]["template"]
    assert template["metadata"]["labels"][ROLE_LABEL] == DOWNLOAD_ROLE
    pod = {"metadata": {"name": "s-llm-cache-abc", "labels": template["metadata"]["labels"]}, "status": {}}
    (entry,) = pod_entries(pod).values()
    assert ray_pods([entry]) == []


def test_cached_once_the_job_completed_and_reported():
    verdict, fields = decide(MODEL, "spec.model.cache", None, COMPLETE, SUCCEEDED, NOW)
    assert verdict is None
    assert fields.wire() == {"state": "Cached", "claimName": "svc-llm-cache", "source": "Qwen/Qwen2.5-7B-Instruct",
                      "jobName": "svc-llm-cache", "bytesDone": 2**30 * 15, "bytesTotal": 2**30 * 15, "files": 9}
    again, kept = decide(MODEL, "spec.model.cache", fields, None, None, NOW)   # the Job gone since: still cached
    assert again is None and kept == fields


# ---- the engine: the Ray work waits for the cache ---------------------------------------------------------
def _cached_service() -> dict:
    doc = llms_manifest("svc")
    doc["metadata"]["namespace"] = "ml"
    doc["spec"]["model"]["cache"] = {"size": "20Gi"}
    return doc


def test_engine_creates_the_cache_first_and_the_rayservice_once_cached():
    doc = _cached_service()
    engine, kube, watches = setup(doc)
    run(engine.reconcile(key_of(doc)))
    applied = [w for w in kube.take() if w[0] == "apply"]
    assert ("apply", "Job", "svc-llm-cache") == applied[-1]   # the Job after what its pod needs
    assert {w[1] for w in applied} == {"PersistentVolumeClaim", "ConfigMap", "ServiceAccount", "Role",
                                       "RoleBinding", "Job"}
    status = kube.objects[key_of(doc)]["status"]
    assert status["phase"] == "Pending" and status["modelCache"]["state"] == "Downloading"
    assert next(c for c in status["conditions"] if c["type"] == "Reconciling")["reason"] == "CachingModel"

    watches.catch_up()
    kube.objects[("ConfigMap", "ml", "svc-llm-cache")]["data"] = dict(RUNNING)
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    assert [w for w in kube.take() if w[0] == "apply"] == []   # the Job exists: nothing is applied again
    status = kube.objects[key_of(doc)]["status"]
    assert "3.0 GiB of 15.0 GiB" in status["message"] and status["modelCache"]["bytesDone"] == 2**30 * 3

    kube.objects[("ConfigMap", "ml", "svc-llm-cache")]["data"] = dict(SUCCEEDED)
    kube.objects[("Job", "ml", "svc-llm-cache")]["status"] = copy.deepcopy(COMPLETE["status"])
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    assert ("apply", "RayService", "svc-llm") in kube.take()
    status = kube.objects[key_of(doc)]["status"]
    assert status["modelCache"]["state"] == "Cached" and status["modelCache"]["bytesTotal"] == 2**30 * 15
    service = kube.objects[("RayService", "ml", "svc-llm")]
    volume, mount = cache_mount(worker_pod(service["spec"]["rayClusterConfig"]), "svc-llm-cache")
    assert mount["readOnly"] is True


def test_engine_stalls_a_finetune_whose_download_failed():
    doc = ft_manifest("tune")
    doc["metadata"]["namespace"] = "ml"
    doc["spec"]["baseModel"]["cache"] = {"size": "20Gi"}
    engine, kube, watches = setup(doc)
    run(engine.reconcile(key_of(doc)))
    watches.catch_up()
    kube.objects[("ConfigMap", "ml", "tune-ft-cache")]["data"] = {
        "state": "Failed", "message": "RepositoryNotFoundError: Qwen/Qwen2.5-7B-Instruct"}
    watches.catch_up()
    run(engine.reconcile(key_of(doc)))
    status = kube.objects[key_of(doc)]["status"]
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert status["phase"] == "Failed" and stalled["status"] == "True" and stalled["reason"] == "ModelCacheFailed"
    assert "spec.baseModel.cache" in stalled["message"] and "RepositoryNotFoundError" in stalled["message"]
    assert not any(k[0] == "RayJob" for k in kube.objects)
