"""Simulated node pools (kwok): a CPU node for Ray heads and GPU nodes shaped like a cloud L4 pool."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plane import LocalPlane

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


@dataclass(frozen=True)
class Pool:
    name: str
    count: int
    cpu: str
    memory: str
    gpus: int = 0
    gpu_product: str | None = None
    disk: str = "500Gi"   # a cloud GPU node's boot disk
    pods: int = 250


DEFAULT_POOLS = (
    Pool("cpu", 1, cpu="32", memory="128Gi"),
    Pool("l4", 2, cpu="48", memory="192Gi", gpus=4, gpu_product="NVIDIA-L4"),
)


def node(pool: Pool, index: int) -> dict:
    name = f"{pool.name}-{index}"
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "type": "kwok", "llmops.dev/pool": pool.name}
    # Local disk too: Ray workers request ephemeral-storage for the model's weights, and the scheduler refuses a
    # pod that asks for more than a node reports.
    resources = {"cpu": pool.cpu, "memory": pool.memory, "ephemeral-storage": pool.disk, "pods": str(pool.pods)}
    taints = []
    if pool.gpus:
        labels.update({"nvidia.com/gpu.product": pool.gpu_product, "nvidia.com/gpu.count": str(pool.gpus),
                       "nvidia.com/gpu.present": "true"})
        resources["nvidia.com/gpu"] = str(pool.gpus)
        taints.append(GPU_TAINT)
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels,
                     "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"taints": taints},
        "status": {"allocatable": resources, "capacity": resources},
    }


def register_pools(plane: LocalPlane, pools: tuple[Pool, ...] = DEFAULT_POOLS) -> None:
    items = [node(pool, i) for pool in pools for i in range(pool.count)]
    plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
                  quiet=True)
    # apply sets a node's status only when it creates the node: a plane whose data outlives an upgrade keeps the
    # old capacity (say, no ephemeral-storage) unless the status is written through its own subresource.
    for item in items:
        plane.kubectl("patch", "node", item["metadata"]["name"], "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": item["status"]}), quiet=True)
    names = [item["metadata"]["name"] for item in items]
    plane.kubectl("wait", "--for=condition=Ready", "--timeout=60s", *(f"node/{n}" for n in names), quiet=True)
