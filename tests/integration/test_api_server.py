"""The CRDs on the real API server: established, examples accepted, invalid manifests refused naming the field."""

from __future__ import annotations

import asyncio
import copy
import json
import logging

import pytest
from kubernetes.client.rest import ApiException

from integration.harness import GROUP, PLURALS, VERSION
from llmops.kube import Credentials, Kube
from manifests import INVALID, example, finetune

pytestmark = pytest.mark.integration


def test_server_is_kubernetes_1_34(cluster):
    from kubernetes import client
    version = client.VersionApi(cluster.api_client).get_code()
    assert version.git_version.startswith("v1.34."), version.git_version


def test_crds_established(plane):
    out = plane.kubectl("get", "crd", "-o",
                        'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Established")].status} {end}',
                        quiet=True).stdout
    for name in ("finetunes.llmops.dev", "batchinferences.llmops.dev", "llmservices.llmops.dev",
                 "rayjobs.ray.io", "rayclusters.ray.io", "rayservices.ray.io"):
        assert f"{name}=True" in out


@pytest.mark.parametrize("path", ["viggo/finetune.yaml", "viggo/batchinference.yaml", "viggo/llmservice.yaml",
                                  "gateway/llmservice.yaml"])
def test_examples_accepted(cluster, ns, path):
    doc = example(path)
    doc["metadata"]["namespace"] = ns
    created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[doc["kind"]], doc,
                                                             field_validation="Strict")
    assert created["metadata"]["uid"]


def test_defaults_applied_by_api_server(cluster, ns):
    created = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunes", finetune("defaults"))
    spec = created["spec"]
    assert spec["method"] == {"type": "lora", "rank": 8, "dropout": 0.0, "target": "all"}
    assert spec["training"]["learningRate"] == 0.0001
    assert spec["dataset"]["cutoffLen"] == 2048


@pytest.mark.parametrize("case_id,doc,field", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_rejected_by_api_server(cluster, ns, case_id, doc, field):
    body = copy.deepcopy(doc)
    body["metadata"]["name"] = case_id
    with pytest.raises(ApiException) as info:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURALS[body["kind"]], body,
                                                       field_validation="Strict")
    assert info.value.status in (400, 422), info.value.body
    assert field in info.value.body, info.value.body


def test_spec_immutable_once_started_except_suspend(cluster, ns):
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunes", finetune("frozen"))
    cluster.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "finetunes", "frozen",
                                                         {"status": {"startTime": "2026-01-01T00:00:00Z"}})
    with pytest.raises(ApiException) as info:
        cluster.patch("FineTune", ns, "frozen", {"spec": {"method": {"rank": 16}}})
    assert "immutable once the job has started" in info.value.body
    suspended = cluster.patch("FineTune", ns, "frozen", {"spec": {"suspend": True}})
    assert suspended["spec"]["suspend"] is True


def test_spec_mutable_before_start(cluster, ns):
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "finetunes", finetune("fresh"))
    patched = cluster.patch("FineTune", ns, "fresh", {"spec": {"method": {"rank": 16}}})
    assert patched["spec"]["method"]["rank"] == 16


def test_kubectl_explain_shows_descriptions(plane):
    out = plane.kubectl("explain", "finetune.spec.method", quiet=True).stdout
    assert "LoRA rank" in out and "Fine-tuning method" in out


def test_kubectl_explain_prints_whole_paragraphs(plane):
    """kubectl explain wraps descriptions itself: every line of a paragraph but its last is a full one (a hard
    line break left in a description prints as a ragged short line)."""
    out = plane.kubectl("explain", "finetune.spec.training.sharedPrefix", quiet=True).stdout
    lines = [line.strip() for line in out.split("DESCRIPTION:", 1)[1].splitlines() if line.strip()]
    assert len(lines) > 3 and all(len(line) > 60 for line in lines[:-1]), out
    conditions = plane.kubectl("explain", "finetune.status.conditions", quiet=True).stdout
    fields = conditions.split("FIELDS:", 1)[1]
    for name in ("lastTransitionTime", "message", "observedGeneration", "reason", "status", "type"):
        assert name in fields, conditions
    assert "<no description>" not in fields and "Suspended=True in place of Ready" in " ".join(conditions.split())
    status = plane.kubectl("explain", "finetune.status", quiet=True).stdout
    assert "<no description>" not in status, status


def test_kubectl_get_llmops_lists_all_kinds(plane, cluster, ns):
    for path in ("viggo/finetune.yaml", "viggo/batchinference.yaml", "viggo/llmservice.yaml"):
        doc = example(path)
        doc["metadata"]["namespace"] = ns
        cluster.create(doc, ns)
    out = plane.kubectl("get", "llmops", "-n", ns, quiet=True).stdout
    assert "finetune.llmops.dev/viggo" in out
    assert "batchinference.llmops.dev/viggo-eval" in out
    assert "llmservice.llmops.dev/viggo-serve" in out


def test_api_server_warnings_reach_the_operator_log_once(plane, ns, caplog):
    """The API server's Warning headers (deprecated APIs, names it advises against) reach the operator's log, each
    distinct one once: here, a finalizer name without a domain on two RayJobs."""
    config = json.loads(plane.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]
    kube = Kube(Credentials(server=server["server"], token=config["users"][0]["user"]["token"],
                            ca_path=server["certificate-authority"]), "llmops")

    def job(name: str, finalizers: list[str]) -> dict:
        return {"apiVersion": "ray.io/v1", "kind": "RayJob",
                "metadata": {"name": name, "namespace": ns, "finalizers": finalizers},
                "spec": {"entrypoint": "true", "suspend": True, "rayClusterSpec": {"headGroupSpec": {
                    "rayStartParams": {}, "template": {"spec": {"containers": [{"name": "ray-head", "image": "ray"}]}}}}}}

    async def apply(finalizers: list[str]) -> None:
        try:
            for name in ("one", "two"):
                await kube.apply(job(name, finalizers))
        finally:
            await kube.close()

    with caplog.at_level(logging.WARNING, logger="llmops"):
        asyncio.run(apply(["plain"]))
        asyncio.run(apply([]))   # the finalizer gone again, or the namespace could not go
    warned = [r.getMessage() for r in caplog.records if "warns" in r.getMessage()]
    assert warned == [f"the API server warns about PATCH /apis/ray.io/v1/namespaces/{ns}/rayjobs/one: "
                      'metadata.finalizers: "plain": prefer a domain-qualified finalizer name to avoid accidental '
                      "conflicts with other finalizer writers (each warning is logged once)"], warned
