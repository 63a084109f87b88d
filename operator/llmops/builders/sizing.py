"""How big a Ray pod's memory-backed /dev/shm and its local disk request are. Pure: spec values in, quantities out."""

from __future__ import annotations

import math
import re

QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
QUANTITY_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
# /dev/shm as a share of the pod's memory: Ray's object store takes 30% of it by default and falls back to slow
# disk when /dev/shm is smaller; the rest is for DataLoader workers and NCCL. An in-memory emptyDir counts
# against the container's memory limit, so it is a share, not an addition.
SHM_SHARE = 0.4
DEFAULT_PARAMS_B = 7.0
# Local disk a Ray worker writes besides the weights: the runtime env (a pip install of the FineTune stack is
# several GB), Hugging Face and pip caches, Ray's logs and spilled objects.
DISK_BASE_GIB = 20
BYTES_PER_PARAM = 2   # bf16 weights, as downloaded


def quantity_bytes(quantity: str) -> float:
    """Bytes in a Kubernetes quantity of the API's QUANTITY_PATTERN (`32Gi`, `8G`, `500M`)."""
    match = QUANTITY.match(str(quantity))
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity such as 32Gi")
    return float(match.group(1)) * QUANTITY_FACTORS[match.group(2)]


def shm_size(memory: str) -> str:
    """sizeLimit of a pod's in-memory /dev/shm: SHM_SHARE of its memory, in whole MiB."""
    return f"{max(64, int(quantity_bytes(memory) * SHM_SHARE / 2**20))}Mi"


def model_params_b(source: str) -> float:
    """Parameter count in billions as the model id states it (`Qwen2.5-7B-Instruct` -> 7), else 7."""
    match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", source.rsplit("/", 1)[-1])
    return float(match.group(1)) if match else DEFAULT_PARAMS_B


def ephemeral_storage(model_source: str) -> str:
    """Local disk a GPU worker requests: every worker downloads the model's weights (a Hugging Face id into its
    cache; an s3:// or gs:// model into the staging folder) next to DISK_BASE_GIB of runtime env, caches and logs.
    A request only, so that the scheduler picks a node with that much free disk; no limit evicts the pod."""
    weights_gib = model_params_b(model_source) * 1e9 * BYTES_PER_PARAM / 2**30
    return f"{DISK_BASE_GIB + math.ceil(weights_gib * 1.2)}Gi"


def shm_volume(memory: str) -> tuple[dict, dict]:
    """KubeRay's advice for Ray pods: /dev/shm as an in-memory emptyDir (a container gets 64 MiB otherwise)."""
    return ({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(memory)}},
            {"name": "dshm", "mountPath": "/dev/shm"})
