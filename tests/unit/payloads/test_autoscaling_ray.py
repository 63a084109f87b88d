"""Ray-venv test: Ray's own KubeRay autoscaler reads every rendered GPU worker group as a node type that offers the
accelerator resource (`accelerator_type:L4`) that vLLM replicas and training workers ask for, so a group with no
pod yet can still be scaled up for them."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

# Internal path (it may move between Ray releases): imported unguarded so that a move fails here.
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr  # noqa: E402

from llmops.builders.common import BuildContext  # noqa: E402
from llmops.render import render_manifests  # noqa: E402
from llmops.settings import Settings  # noqa: E402

SPEC_RESOURCES = {"workers": 2, "gpusPerWorker": 1, "accelerator": "L4", "cpusPerWorker": 4, "memoryPerWorker": "16Gi"}
DOCS = [
    {"apiVersion": "llmops.dev/v1alpha1", "kind": "LLMService", "metadata": {"name": "svc", "namespace": "ns"},
     "spec": {"modelId": "m", "model": {"source": "Qwen/Qwen2.5-7B-Instruct"}, "resources": SPEC_RESOURCES,
              "autoscaling": {"minReplicas": 0, "maxReplicas": 3}}},
    {"apiVersion": "llmops.dev/v1alpha1", "kind": "FineTune", "metadata": {"name": "ft", "namespace": "ns"},
     "spec": {"baseModel": {"source": "Qwen/Qwen2.5-7B-Instruct"}, "template": "qwen",
              "dataset": {"train": {"uri": "s3://b/train.jsonl"}}, "resources": SPEC_RESOURCES,
              "output": {"uri": "s3://b/adapters/ft"}}},
]


def ray_clusters():
    objects, errors = render_manifests(DOCS, BuildContext(settings=Settings(), payloads={"x.py": ""}))
    assert not errors, errors
    for obj in objects:
        if obj["kind"] in ("RayJob", "RayService"):
            spec = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig")
            yield obj["kind"], {"metadata": {"name": obj["metadata"]["name"], "namespace": "ns"}, "spec": spec}


@pytest.mark.parametrize("kind", ["RayService", "RayJob"])
def test_the_autoscaler_sees_the_accelerator_on_a_group_with_no_pod(kind):
    cr = dict(ray_clusters())[kind]
    node_types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    gpu = node_types["gpu"]
    assert gpu["resources"]["accelerator_type:L4"] == 1 and gpu["resources"]["GPU"] == 1
    assert "accelerator_type:L4" not in node_types["headgroup"]["resources"]
    if kind == "RayService":
        assert (gpu["min_workers"], gpu["max_workers"]) == (0, 3)
