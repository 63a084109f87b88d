"""Operator settings: typed, loaded once at start-up from a YAML file and LLMOPS_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

RAY_VERSION = "2.60.0"
"""The Ray the CPU test environments check rendered configs against (Ray's own config models)."""
LLAMAFACTORY_VERSION = "0.9.4"
# The images the Ray pods run. Ray's own build configuration (docs/clusters.md, *Images*) builds ray-llm for Python
# 3.12 on CUDA 13.0 only, tagged `<ray>-py312-cu130`; 2.57.0 is the Ray whose `ray[llm]` pins vLLM 0.25.1, the stack
# this project's GPU run used (Python 3.12, CUDA 13).
IMAGE_RAY_VERSION = "2.57.0"
IMAGE_PLATFORM = "py312-cu130"
STOCK_RAY_IMAGE = f"rayproject/ray:{IMAGE_RAY_VERSION}-{IMAGE_PLATFORM}"
INFERENCE_IMAGE = f"rayproject/ray-llm:{IMAGE_RAY_VERSION}-{IMAGE_PLATFORM}"
# The FineTune image the release workflow publishes (.github/workflows/release.yaml, docker/ray-runtime.Dockerfile):
# the stock Ray image with the LLaMA-Factory stack installed, tagged with this project's version.
RUNTIME_IMAGE_REPOSITORY = "ghcr.io/llmops/llmops-ray-llamafactory"
PROJECT_VERSION = "0.1.0"
FINETUNE_IMAGE = f"{RUNTIME_IMAGE_REPOSITORY}:{PROJECT_VERSION}"
FINETUNE_PIP_FALLBACK = [
    f"llamafactory=={LLAMAFACTORY_VERSION}", "transformers==4.52.4", "liger-kernel==0.5.10",
    # torchaudio does not declare its torch version and LLaMA-Factory imports it: pin the three together.
    "torch==2.11.0", "torchaudio==2.11.0", "torchvision==0.26.0"]
"""What the runtime image adds to the stock Ray image; with finetune_image set to STOCK_RAY_IMAGE, finetune_pip
installs it on every pod at start instead (docs/clusters.md, *The training image*)."""


class AcceleratorProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node_selector: dict[str, str]
    """Labels that pick this accelerator's node pool."""
    tolerations: list[dict[str, Any]] = Field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    ray_accelerator_type: str
    """Ray's accelerator_type resource name (ray.util.accelerators)."""
    gpu_memory_gib: float
    gpu_resource: str = "nvidia.com/gpu"


# Node labels that pick an accelerator's nodes differ per platform; `Settings.cloud` picks one set (the chart's
# one `cloud` value). Ray's accelerator_type and the GPU memory are the same everywhere.
CLOUDS = ("gpu-operator", "gke", "eks")
Cloud = Literal["gpu-operator", "gke", "eks"]
GPUS = {  # profile -> (Ray accelerator_type, GiB per GPU)
    "L4": ("L4", 24), "A10G": ("A10G", 24), "L40S": ("L40S", 48), "A100": ("A100-80G", 80), "H100": ("H100", 80),
    "H200": ("H200", 141)}
NODE_SELECTORS: dict[str, dict[str, dict[str, str]]] = {
    # NVIDIA GPU Operator (GPU Feature Discovery labels each GPU node with its product name)
    "gpu-operator": {
        "L4": {"nvidia.com/gpu.product": "NVIDIA-L4"},
        "A10G": {"nvidia.com/gpu.product": "NVIDIA-A10G"},
        "L40S": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
        "A100": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        "H100": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "H200": {"nvidia.com/gpu.product": "NVIDIA-H200"},
    },
    # GKE labels every GPU node pool with its accelerator (GKE has no A10G or L40S machines)
    "gke": {
        "L4": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        "A100": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"},
        "H100": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "H200": {"cloud.google.com/gke-accelerator": "nvidia-h200-141gb"},
    },
    # EKS with Karpenter: its well-known labels name the GPU and the instance family that carries it
    "eks": {
        "L4": {"karpenter.k8s.aws/instance-gpu-name": "l4", "karpenter.k8s.aws/instance-family": "g6"},
        "A10G": {"karpenter.k8s.aws/instance-gpu-name": "a10g", "karpenter.k8s.aws/instance-family": "g5"},
        "L40S": {"karpenter.k8s.aws/instance-gpu-name": "l40s", "karpenter.k8s.aws/instance-family": "g6e"},
        "A100": {"karpenter.k8s.aws/instance-gpu-name": "a100", "karpenter.k8s.aws/instance-family": "p4de"},
        "H100": {"karpenter.k8s.aws/instance-gpu-name": "h100", "karpenter.k8s.aws/instance-family": "p5"},
        # two instance families carry H200 (p5e, p5en): the GPU's name alone picks either
        "H200": {"karpenter.k8s.aws/instance-gpu-name": "h200"},
    },
}


def cloud_profiles(cloud: str) -> dict[str, AcceleratorProfile]:
    """The built-in accelerator profiles of one platform."""
    return {name: AcceleratorProfile(node_selector=selector, ray_accelerator_type=GPUS[name][0],
                                     gpu_memory_gib=GPUS[name][1])
            for name, selector in NODE_SELECTORS[cloud].items()}


DEFAULT_PROFILES = cloud_profiles("gpu-operator")


class HeadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu: str = "2"
    memory: str = "8Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class Settings(BaseModel):
    """Everything the operator is configured with; builders receive it as an argument."""

    model_config = ConfigDict(extra="forbid")

    finetune_image: str = FINETUNE_IMAGE
    """Ray image for FineTune jobs: by default the published runtime image, which carries LLaMA-Factory and its
    pins. The stock Ray image works too, with LLaMA-Factory installed through `finetune_pip` (slow: docs)."""
    finetune_pip: list[str] = Field(default_factory=list)
    """pip requirements added to every FineTune's runtime environment: empty for the runtime image; FINETUNE_PIP_FALLBACK
    (LLaMA-Factory 0.9.4, transformers 4.52.4 for its neat packing with SDPA, liger-kernel, torch) on the stock image."""
    finetune_flash_attention: bool = False
    """The FineTune image has flash-attn (the runtime image does): the recipe then uses FA2 varlen attention,
    otherwise SDPA with neat packing, the default (about 6% slower on one H100; docs/training-recipe.md)."""
    inference_image: str = INFERENCE_IMAGE
    """Ray LLM image (vLLM) for BatchInference and LLMService."""
    runtime_env_setup_timeout_seconds: int = Field(default=1800, ge=60)
    """Ray's limit on setting up a job's runtime environment when it installs pip packages (Ray's own default, 600 s,
    is shorter than a pip install of the LLaMA-Factory stack, several GB, on a cold node)."""
    cloud: Cloud = "gpu-operator"
    """Platform whose node labels pick the GPU nodes: `gpu-operator` (nvidia.com/gpu.product, added by the NVIDIA
    GPU Operator's feature discovery), `gke` (cloud.google.com/gke-accelerator) or `eks` (Karpenter's
    karpenter.k8s.aws/instance-gpu-name and instance-family). docs/clusters.md."""
    accelerators: dict[str, AcceleratorProfile] = Field(default_factory=dict)
    """Accelerator profiles added to the cloud's built-in ones, or replacing one of the same name."""
    head: HeadSettings = Field(default_factory=HeadSettings)
    ray_service_account_annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations on the ServiceAccounts the operator creates for Ray pods (`<name>-<ft|bi>-ray`), e.g.
    eks.amazonaws.com/role-arn for IRSA. A resource's spec.serviceAccountName uses an account of its own instead."""
    ray_pod_security: Literal["baseline", "restricted"] = "baseline"
    """The Pod Security Standard the Ray pods and the model download Job meet. `baseline` sets no more than
    `ray_fs_group`; `restricted` also runs them as non-root (the image's USER must be numeric and not 0, as the
    default images' 1000 is), with the runtime's default seccomp profile, no privilege escalation and no
    capabilities: what a namespace labelled pod-security.kubernetes.io/enforce=restricted admits. docs/clusters.md."""
    ray_fs_group: int | None = Field(default=100, ge=1)
    """The group that owns the PersistentVolumeClaims a Ray pod writes (securityContext.fsGroup, changed only where
    the claim's root does not match already), so that the images' non-root user (uid 1000, group 100) can write
    a fresh claim: an adapter, checkpoints, a model cache. null leaves it to the platform (OpenShift's security
    context constraints assign one)."""
    field_manager: str = "llmops"
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty means all."""
    cluster_domain: str = "cluster.local"

    def profiles(self) -> dict[str, AcceleratorProfile]:
        """Every accelerator profile a spec may name: the cloud's, with `accelerators` over them."""
        return {**cloud_profiles(self.cloud), **self.accelerators}

    @classmethod
    def load(cls, path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
        """From a YAML file (LLMOPS_SETTINGS_FILE) with LLMOPS_* variables over it."""
        environ = os.environ if environ is None else environ
        path = path or environ.get("LLMOPS_SETTINGS_FILE")
        data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {} if path else {}
        for key in ("finetune_image", "inference_image", "field_manager", "cluster_domain", "cloud"):
            if f"LLMOPS_{key.upper()}" in environ:
                data[key] = environ[f"LLMOPS_{key.upper()}"]
        if environ.get("LLMOPS_NAMESPACES"):
            data["namespaces"] = [n.strip() for n in environ["LLMOPS_NAMESPACES"].split(",") if n.strip()]
        return cls.model_validate(data)
