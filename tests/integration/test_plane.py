"""The local control plane is the real thing: versions, simulated GPU pool, KubeRay placing pods, GC."""

from __future__ import annotations

import pytest

from integration.harness import wait_for

pytestmark = pytest.mark.integration

SAMPLE_RAYJOB = {
    "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "sample"},
    "spec": {
        "entrypoint": "python -c 'print(1)'",
        "rayClusterSpec": {
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
                {"name": "ray-head", "image": "rayproject/ray:2.60.0",
                 "resources": {"requests": {"cpu": "1", "memory": "2Gi"}}}]}}},
            "workerGroupSpecs": [{
                "groupName": "gpu", "replicas": 2, "minReplicas": 2, "maxReplicas": 2, "rayStartParams": {},
                "template": {"spec": {
                    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{"name": "ray-worker", "image": "rayproject/ray:2.60.0",
                                    "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "2", "memory": "8Gi"}}}]}},
            }],
        },
    },
}


def test_component_versions(plane):
    out = plane.kubectl("version", "-o", "json", quiet=True).stdout
    assert '"gitVersion": "v1.34.' in out


def test_simulated_gpu_pool(plane, cluster):
    nodes = {n.metadata.name: n for n in cluster.core.list_node().items}
    l4 = [n for n in nodes.values() if n.metadata.labels.get("nvidia.com/gpu.product") == "NVIDIA-L4"]
    assert len(l4) == next(p.count for p in plane.pools if p.gpu_product == "NVIDIA-L4") >= 2
    for node in l4:
        assert node.status.allocatable["nvidia.com/gpu"] == "4"
        assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in node.spec.taints)
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    assert "cpu-0" in nodes and not [t for t in nodes["cpu-0"].spec.taints or [] if t.effect == "NoSchedule"]


def test_kuberay_places_a_sample_rayjob_and_gc_cleans_up(cluster, ns):
    cluster.custom.create_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", SAMPLE_RAYJOB)
    wait_for(lambda: cluster.ray_list("rayclusters", ns), timeout=60, what="KubeRay's RayCluster")

    def running():
        pods = cluster.pods(ns, "ray.io/is-ray-node=yes")
        return pods if len(pods) == 3 and all(p.status.phase == "Running" for p in pods) else None
    pods = wait_for(running, timeout=90, what="3 Running pods")
    for pod in pods:
        node = pod.spec.node_name
        if pod.metadata.labels["ray.io/node-type"] == "worker":
            assert node.startswith("l4-"), node
        else:
            assert node == "cpu-0", node
    cluster.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", "sample")
    wait_for(lambda: not cluster.ray_list("rayclusters", ns) and not cluster.pods(ns, "ray.io/is-ray-node=yes"),
             timeout=90, what="the garbage collector to remove the RayCluster and its pods")


def test_dev_cli_up_status_down(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LLMOPS_DEV_DIR": str(tmp_path / "dev"), "PYTHONPATH": str(repo / "operator")}
    cli = [sys.executable, "-m", "llmops.cli", "dev"]
    try:
        up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "kube-apiserver" in status.stdout and "STOPPED" not in status.stdout
        kubectl_env = {**env, "KUBECONFIG": str(tmp_path / "dev" / "kubeconfig")}
        nodes = subprocess.run([str(Path.home() / ".cache/llmops/bin/kubectl") if not os.environ.get("LLMOPS_CACHE")
                                else os.path.join(os.environ["LLMOPS_CACHE"], "bin", "kubectl"),
                                "get", "nodes", "-L", "nvidia.com/gpu.product"],
                               env=kubectl_env, capture_output=True, text=True, timeout=30)
        assert "NVIDIA-L4" in nodes.stdout and "l4-1" in nodes.stdout
    finally:
        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0
    again = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "not running" in again.stdout
