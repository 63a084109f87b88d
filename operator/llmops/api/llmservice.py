"""LLMService: an OpenAI-compatible endpoint (ray.serve.llm) for a base model and its LoRA adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .batchinference import METRICS, Engine
from .common import (
    MAX_LIST,
    MAX_STRING,
    MODEL_SOURCE_PATTERN,
    ApiModel,
    LocalRef,
    Resources,
    StatusBase,
    WorkloadControls,
    cel,
    exactly_one,
    validations,
)

SERVE_LORA_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
ADAPTER_URI_PATTERN = r"^(s3://|gs://|abfss://|azure://|pvc://)[^\s]+$"


class ServedModel(ApiModel):
    source: str = Field(pattern=MODEL_SOURCE_PATTERN, max_length=MAX_STRING)
    """Base model (Hugging Face id, s3://, gs:// or pvc://)."""


class Gate(ApiModel):
    batch_inference_ref: LocalRef
    """The BatchInference whose metric decides."""
    metric: Literal["exactMatch", "functionNameAccuracy", "attributeF1"] = "exactMatch"
    """Metric from that BatchInference's status.metrics."""
    minimum: float = Field(ge=0, le=1)
    """Serve the adapter only when the metric is at least this."""


class Adapter(ApiModel):
    model_config = validations(exactly_one(["fineTuneRef", "uri"], "adapters[]"))

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", max_length=63)
    """Adapter id: clients request it as model="<modelId>:<name>"."""
    fine_tune_ref: LocalRef | None = None
    """Serve the adapter this FineTune produced (waits for it)."""
    uri: str | None = Field(default=None, pattern=ADAPTER_URI_PATTERN, max_length=MAX_STRING)
    """Adapter folder in object storage (s3://, gs://, abfss://, azure://)."""
    gate: Gate | None = None
    """Serve only once an evaluation meets a minimum."""

    @model_validator(mode="after")
    def _one_source(self) -> Adapter:
        if (self.fine_tune_ref is None) == (self.uri is None):
            raise ValueError(f"spec.adapters[{self.name}]: set exactly one of fineTuneRef, uri")
        return self


class Lora(ApiModel):
    dynamic_loading_path: str | None = Field(default=None, pattern=r"^(s3://|gs://|abfss://|azure://)[^\s]+$",
                                             max_length=MAX_STRING)
    """Common parent of all adapters. Unset: derived from the adapters' locations."""
    max_adapters_per_replica: int = Field(default=4, ge=1, le=256)
    """Adapters a replica keeps loaded (also the engine's max_loras)."""
    max_rank: int = Field(default=64, ge=1, le=256)
    """Largest LoRA rank the engine accepts."""


class Autoscaling(ApiModel):
    model_config = validations(cel("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                                   "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"))

    min_replicas: int = Field(default=1, ge=0, le=512)
    """Fewest model replicas (0 scales to zero)."""
    max_replicas: int = Field(default=1, ge=1, le=512)
    """Most model replicas."""
    target_ongoing_requests: int = Field(default=16, ge=1, le=4096)
    """Requests in flight per replica that autoscaling aims for."""

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas")
        return self


class LLMServiceSpec(WorkloadControls):
    model_config = validations(
        cel("!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            "adapters[].name must be unique", field_path=".adapters"),
    )

    model_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)
    """The id clients request (e.g. ft-model); adapters are "<modelId>:<adapter>"."""
    model: ServedModel
    """The base model."""
    adapters: list[Adapter] | None = Field(default=None, max_length=MAX_LIST)
    """LoRA adapters to serve beside the base model."""
    lora: Lora = Field(default_factory=Lora)
    """Multi-LoRA settings."""
    engine: Engine = Field(default_factory=Engine)
    """vLLM engine settings."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    """Replica autoscaling."""
    resources: Resources = Field(default_factory=Resources)
    """GPU workers: per-worker size and node pool; the worker group autoscales up to what replicas need."""
    upgrade_strategy: Literal["NewCluster", "None"] = "NewCluster"
    """How a change to model, engine or resources rolls out: NewCluster (zero downtime, needs twice the GPUs
    while it runs) or None (in place). Adapter changes always apply in place."""

    @model_validator(mode="after")
    def _unique_adapters(self) -> LLMServiceSpec:
        names = [a.name for a in self.adapters or []]
        if len(names) != len(set(names)):
            raise ValueError("spec.adapters[].name must be unique")
        return self


class AdapterState(ApiModel):
    name: str
    """The adapter's name in spec.adapters."""
    uri: str | None = None
    """Where it is loaded from, once known."""
    state: str
    """Serving, WaitingForFineTune, WaitingForEvaluation, GateNotMet, Unsupported or Failed."""
    message: str | None = None
    """Why it is in that state, and what to do."""


class LLMServiceStatus(StatusBase):
    ray_service_name: str | None = None
    """The RayService that serves it."""
    endpoint: str | None = None
    """In-cluster OpenAI-compatible base URL."""
    models: list[str] | None = None
    """Model ids a client can request."""
    adapters: list[AdapterState] | None = None
    """Each adapter of spec.adapters: served, or why not yet."""


__all__ = ["METRICS", "SERVE_LORA_SCHEMES", "LLMServiceSpec", "LLMServiceStatus"]
