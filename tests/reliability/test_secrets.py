"""Secrets: values planted in the Secrets that `secrets.huggingFaceToken` and `secrets.storage` reference appear
nowhere but in those Secrets, after the whole workflow (FineTune -> BatchInference on its adapter -> LLMService
serving it behind a gate, plus a job that fails): not in any object of the namespace (every listable kind:
RayJobs, RayServices, RayClusters, Jobs, Pods, ConfigMaps incl. result ConfigMaps, ServiceAccounts, Roles, Events,
the llmops resources with their status, ...), not in the operator's log. And the operator never reads a Secret
(audit log: no request on secrets from kopf's or the operator's client)."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from integration.harness import phase
from llmops.dev.simulator import Plan
from manifests import batchinference, finetune, llmservice
from reliability.control import simulator_running, unhandled_errors
from reliability.support import wait_until

pytestmark = pytest.mark.integration


def planted_values() -> dict[str, str]:
    tag = uuid.uuid4().hex
    return {"HF_TOKEN": f"hf_canary{tag}", "AWS_ACCESS_KEY_ID": f"AKIACANARY{tag[:12].upper()}",
            "AWS_SECRET_ACCESS_KEY": f"canary/{tag}+secret"}


def forms(value: str) -> list[str]:
    """The value as it may appear when copied: plain, base64 (a Secret's data), and JSON-escaped."""
    raw = value.encode()
    return [value, base64.b64encode(raw).decode(), base64.b64encode(raw).decode().rstrip("="),
            json.dumps(value)[1:-1]]


def namespaced_kinds(plane) -> list[str]:
    out = plane.kubectl("api-resources", "--namespaced=true", "--verbs=list", "-o", "name", quiet=True).stdout
    return sorted(k for k in out.split() if k not in ("secrets",))


def test_planted_secret_values_never_leak(plane, cluster, ns, operators, record):
    values = planted_values()
    cluster.core.create_namespaced_secret(ns, {"metadata": {"name": "hf-token"},
                                               "stringData": {"token": values["HF_TOKEN"]}})
    cluster.core.create_namespaced_secret(ns, {"metadata": {"name": "storage-creds"}, "stringData": {
        k: values[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    refs = {"huggingFaceToken": {"name": "hf-token", "key": "token"}, "storage": {"name": "storage-creds"}}

    operators.start(ns, name="operator")
    docs = [finetune("tuned"), batchinference("judged", fine_tune="tuned"),
            llmservice("served", adapters=[{"name": "tuned", "fineTuneRef": {"name": "tuned"},
                                            "gate": {"batchInferenceRef": {"name": "judged"}, "minimum": 0.5}}]),
            finetune("broken")]
    docs[2]["spec"]["model"]["cache"] = {"size": "20Gi"}   # its download Job gets the credentials too
    for doc in docs:
        doc["spec"]["secrets"] = refs
        cluster.create(doc, ns)
    with simulator_running(plane, ns) as sim:
        sim.plans[(ns, "broken-ft")] = Plan("Failed", "simulated: CUDA out of memory")

        def workflow_done():
            svc = cluster.get("LLMService", ns, "served") or {}
            adapters = (svc.get("status") or {}).get("adapters") or []
            return (phase(cluster.get("FineTune", ns, "tuned")) == "Succeeded"
                    and phase(cluster.get("BatchInference", ns, "judged")) == "Succeeded"
                    and phase(cluster.get("FineTune", ns, "broken")) == "Failed"
                    and adapters and adapters[0]["state"] == "Serving"
                    # The service's own pods: its model is cached first, so they come after its adapters resolve.
                    and any(p.metadata.name.startswith("served-")
                            for p in cluster.pods(ns, "ray.io/is-ray-node=yes")))
        ok, _ = wait_until(workflow_done, timeout=240, interval=2)
    assert ok, "the workflow did not complete"
    # The Ray pods that still run (the service's) get the credentials by reference only.
    pods = [cluster.api_client.sanitize_for_serialization(p) for p in cluster.pods(ns, "ray.io/is-ray-node=yes")]
    assert pods, "no Ray pods to look at"
    for pod in pods:
        container = pod["spec"]["containers"][0]
        hf = next((e for e in container.get("env") or [] if e["name"] == "HF_TOKEN"), {})
        assert hf.get("valueFrom", {}).get("secretKeyRef") == {"name": "hf-token", "key": "token"}, container
        assert {"secretRef": {"name": "storage-creds"}} in (container.get("envFrom") or []), container
    download = cluster.api_client.sanitize_for_serialization(
        client.BatchV1Api(cluster.api_client).read_namespaced_job("served-llm-cache", ns))
    container = download["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in container["env"]
    assert {"secretRef": {"name": "storage-creds"}} in container["envFrom"]

    kinds = namespaced_kinds(plane)
    listing = json.loads(plane.kubectl("get", ",".join(kinds), "-n", ns, "-o", "json", quiet=True).stdout)
    objects = listing["items"]
    leaks = []
    for obj in objects:
        text = json.dumps(obj)
        for name, value in values.items():
            if any(f in text for f in forms(value)):
                leaks.append(f"{obj['kind']}/{obj['metadata']['name']} contains {name}")
    log = operators.logs()
    leaks += [f"operator log contains {name}" for name, value in values.items() if any(f in log for f in forms(value))]

    # The operator itself never asks for a Secret (kopf's client and its own writer, by user agent).
    reads = []
    with open(plane.logs / "audit.log") as audit:
        for line in audit:
            if '"secrets"' not in line:
                continue
            entry = json.loads(line)
            ref = entry.get("objectRef") or {}
            agent = entry.get("userAgent", "")
            if ref.get("resource") == "secrets" and ref.get("namespace") == ns and (
                    "kopf" in agent or "llmops" in agent):
                reads.append(f"{entry.get('verb')} {ref.get('name', '')} by {agent}")
    kinds_seen = sorted({o["kind"] for o in objects})
    record(secret_values_planted=len(values), objects_scanned=len(objects), kinds_scanned=len(kinds_seen),
           ray_pods_with_secret_refs=len(pods), leaks=len(leaks), operator_secret_requests=len(reads))
    print("kinds scanned:", ", ".join(kinds_seen))
    assert {"RayJob", "RayService", "ConfigMap", "ServiceAccount", "Role", "Event", "Pod", "FineTune",
            "BatchInference", "LLMService", "Job", "PersistentVolumeClaim"} <= set(kinds_seen), kinds_seen
    assert not leaks, leaks
    assert not reads, reads
    assert not unhandled_errors(log)
    for name in ("hf-token", "storage-creds"):  # the Secrets are untouched and still hold the values
        try:
            cluster.core.read_namespaced_secret(name, ns)
        except ApiException as e:
            pytest.fail(f"Secret {name} is gone: {e.status}")
