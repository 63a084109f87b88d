"""The Ray pods' securityContexts: a written claim's group by default, the restricted standard on request.

The integration test (tests/integration/test_pod_security.py) has the real API server's Pod Security admission
judge the pods KubeRay makes from these; here, what each setting renders."""

from __future__ import annotations

from llmops.builders.common import BuildContext, load_payloads
from llmops.render import render_manifests
from llmops.settings import Settings
from manifests import example, finetune

RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
CLAIM_GROUP = {"fsGroup": 100, "fsGroupChangePolicy": "OnRootMismatch"}


def _render(*docs, **settings):
    objects, errors = render_manifests(list(docs), BuildContext(settings=Settings(**settings),
                                                                payloads=load_payloads()))
    assert not errors, errors
    return objects


def _pods(obj):
    """Every pod spec an object carries, by role."""
    spec = obj["spec"]
    if obj["kind"] == "Job":
        return {"download": spec["template"]["spec"]}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}}
    if "submitterPodTemplate" in spec:
        pods["submitter"] = spec["submitterPodTemplate"]["spec"]
    return pods


def _workloads(objects):
    return [o for o in objects if o["kind"] in ("RayJob", "RayService", "Job")]


def _pvc_output(name):
    doc = finetune(name)
    doc["spec"]["output"]["uri"] = "pvc://adapters/" + name
    return doc


def _all_kinds():
    return (example("viggo/finetune.yaml"), example("viggo/batchinference.yaml"), example("viggo/llmservice.yaml"),
            example("model-cache/finetune.yaml"), example("model-cache/llmservice.yaml"), _pvc_output("to-claim"))


def test_by_default_only_a_pod_that_writes_a_claim_gets_its_group():
    objects = _render(*_all_kinds())
    seen = set()
    for obj in _workloads(objects):
        writes = obj["kind"] == "Job" or obj["metadata"]["name"].startswith("to-claim")
        for role, pod in _pods(obj).items():
            seen.add((obj["kind"], writes))
            assert pod.get("securityContext") == (CLAIM_GROUP if writes else None), (obj["metadata"]["name"], role)
            assert all("securityContext" not in c for c in pod["containers"])
        assert "submitterPodTemplate" not in obj["spec"] and "autoscalerOptions" not in str(obj)
    # every kind seen, writing and not: the cached models' download Jobs and a FineTune whose output is a claim
    assert seen == {("RayJob", False), ("RayService", False), ("Job", True), ("RayJob", True)}


def test_no_group_where_the_platform_assigns_it():
    for obj in _workloads(_render(_pvc_output("to-claim"), example("model-cache/llmservice.yaml"),
                                  ray_fs_group=None)):
        assert all("securityContext" not in pod for pod in _pods(obj).values())


def test_restricted_covers_every_pod_and_container_kuberay_makes():
    objects = _render(*_all_kinds(), ray_pod_security="restricted")
    for obj in _workloads(objects):
        pods = _pods(obj)
        if obj["kind"] == "RayJob":   # KubeRay's default submitter pod would carry no securityContext
            assert "submitter" in pods
            submitter = pods["submitter"]["containers"][0]
            assert submitter["name"] == "ray-job-submitter" and "command" not in submitter   # KubeRay adds it
            assert submitter["image"] == pods["head"]["containers"][0]["image"]
        if obj["kind"] == "RayService":   # KubeRay adds the autoscaler container to the head pod
            autoscaler = obj["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
            assert autoscaler == RESTRICTED_CONTAINER
        writes = obj["kind"] == "Job" or obj["metadata"]["name"].startswith("to-claim")
        for role, pod in pods.items():
            expected = {**RESTRICTED_POD, **(CLAIM_GROUP if writes and role != "submitter" else {})}
            assert pod["securityContext"] == expected, (obj["metadata"]["name"], role)
            for c in pod["containers"]:
                assert c["securityContext"] == RESTRICTED_CONTAINER, (obj["metadata"]["name"], role, c["name"])
            # the volume types the restricted standard allows (no hostPath)
            assert all({"configMap", "emptyDir", "persistentVolumeClaim"} & set(v) for v in pod.get("volumes", []))


def test_restricted_changes_nothing_else():
    """The securityContexts and the submitter template are all that `restricted` adds."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if k not in ("securityContext", "submitterPodTemplate", "autoscalerOptions")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    assert strip(_render(*_all_kinds(), ray_pod_security="restricted")) == strip(_render(*_all_kinds()))
