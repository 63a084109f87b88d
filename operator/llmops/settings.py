"""Operator settings: typed, loaded once at start-up from a YAML file and LLMOPS_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

RAY_VERSION = "2.60.0"
LLAMAFACTORY_VERSION = "0.9.4"


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


def _gpu(product: str, ray_type: str, memory: float) -> AcceleratorProfile:
    return AcceleratorProfile(node_selector={"nvidia.com/gpu.product": product}, ray_accelerator_type=ray_type,
                              gpu_memory_gib=memory)


DEFAULT_PROFILES = {
    "L4": _gpu("NVIDIA-L4", "L4", 24),
    "A10G": _gpu("NVIDIA-A10G", "A10G", 24),
    "L40S": _gpu("NVIDIA-L40S", "L40S", 48),
    "A100": _gpu("NVIDIA-A100-SXM4-80GB", "A100-80G", 80),
    "H100": _gpu("NVIDIA-H100-80GB-HBM3", "H100", 80),
    "H200": _gpu("NVIDIA-H200", "H200", 141),
}


class HeadSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpu: str = "2"
    memory: str = "8Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class Settings(BaseModel):
    """Everything the operator is configured with; builders receive it as an argument."""

    model_config = ConfigDict(extra="forbid")

    finetune_image: str = f"rayproject/ray:{RAY_VERSION}-py311-cu128"
    """Ray image for FineTune jobs; LLaMA-Factory comes through `finetune_pip` unless the image has it."""
    finetune_pip: list[str] = Field(default_factory=lambda: [
        f"llamafactory=={LLAMAFACTORY_VERSION}", "transformers==4.52.4", "liger-kernel==0.5.10",
        # torchaudio does not declare its torch version and LLaMA-Factory imports it: pin the three together.
        "torch==2.11.0", "torchaudio==2.11.0", "torchvision==0.26.0"])
    """pip requirements added to every FineTune's runtime environment (empty when the image carries them).
    transformers 4.52.4 keeps LLaMA-Factory's neat packing working with SDPA attention (no flash-attn needed)."""
    finetune_flash_attention: bool = False
    """The FineTune image has flash-attn (our runtime image does): the recipe then uses FA2 varlen attention,
    otherwise SDPA with neat packing, the default (about 6% slower on one H100; docs/training-recipe.md)."""
    inference_image: str = f"rayproject/ray-llm:{RAY_VERSION}-py311-cu128"
    """Ray LLM image (vLLM) for BatchInference and LLMService."""
    accelerators: dict[str, AcceleratorProfile] = Field(default_factory=lambda: dict(DEFAULT_PROFILES))
    head: HeadSettings = Field(default_factory=HeadSettings)
    field_manager: str = "llmops"
    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty means all."""
    cluster_domain: str = "cluster.local"

    @classmethod
    def load(cls, path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
        """From a YAML file (LLMOPS_SETTINGS_FILE) with LLMOPS_* variables over it."""
        environ = os.environ if environ is None else environ
        path = path or environ.get("LLMOPS_SETTINGS_FILE")
        data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {} if path else {}
        for key in ("finetune_image", "inference_image", "field_manager", "cluster_domain"):
            if f"LLMOPS_{key.upper()}" in environ:
                data[key] = environ[f"LLMOPS_{key.upper()}"]
        if environ.get("LLMOPS_NAMESPACES"):
            data["namespaces"] = [n.strip() for n in environ["LLMOPS_NAMESPACES"].split(",") if n.strip()]
        return cls.model_validate(data)
