"""The llmops API: one entry per kind, tying its spec and status models to its CRD names and columns."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from .batchinference import BatchInferenceSpec, BatchInferenceStatus
from .common import API_VERSION, GROUP, VERSION
from .finetune import FineTuneSpec, FineTuneStatus
from .llmservice import LLMServiceSpec, LLMServiceStatus

CATEGORY = "llmops"


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_name: str
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    description: str
    printer_columns: tuple[dict, ...] = ()
    immutable_once_started: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


def _column(name: str, path: str, type_: str = "string", priority: int = 0, description: str = "") -> dict:
    column = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        column["priority"] = priority
    if description:
        column["description"] = description
    return column


PHASE = _column("Phase", ".status.phase", description="One-word summary of where the resource is")
# Every condition carries the reason; Reconciling is always there (Ready is not while suspended).
REASON = _column("Reason", '.status.conditions[?(@.type=="Reconciling")].reason',
                 description="Why the resource is in its phase")
AGE = _column("Age", ".metadata.creationTimestamp", "date")
# Beside the figures it qualifies, so a simulated number never shows without its mark.
SIMULATED = _column("Simulated", ".status.metrics.simulated", "boolean",
                    description="true when the local plane's simulator wrote the metrics (no model ran)")

FINETUNE = Kind(
    kind="FineTune", plural="finetunes", short_name="ft", spec_model=FineTuneSpec, status_model=FineTuneStatus,
    description="LoRA fine-tune of a base model with LLaMA-Factory on a KubeRay RayJob; writes an adapter to "
                "object storage.",
    printer_columns=(PHASE, _column("Base Model", ".spec.baseModel.source"), REASON,
                     _column("Adapter", ".status.adapter.uri", priority=1),
                     _column("Train Loss", ".status.metrics.trainLoss", "number", priority=1),
                     {**SIMULATED, "priority": 1}, AGE),
    immutable_once_started=True,
)
BATCHINFERENCE = Kind(
    kind="BatchInference", plural="batchinferences", short_name="bi", spec_model=BatchInferenceSpec,
    status_model=BatchInferenceStatus,
    description="Offline generation over a dataset with ray.data.llm (vLLM) on a KubeRay RayJob, with evaluation "
                "metrics.",
    printer_columns=(PHASE, _column("Rows", ".status.metrics.rows", "integer"),
                     _column("Exact Match", ".status.metrics.exactMatch", "number"), SIMULATED, REASON,
                     _column("Output", ".status.outputURI", priority=1), AGE),
    immutable_once_started=True,
)
LLMSERVICE = Kind(
    kind="LLMService", plural="llmservices", short_name="llms", spec_model=LLMServiceSpec,
    status_model=LLMServiceStatus,
    description="OpenAI-compatible endpoint (ray.serve.llm on a KubeRay RayService) for a base model and its LoRA "
                "adapters, with autoscaling and zero-downtime upgrades.",
    printer_columns=(PHASE, _column("Model", ".spec.modelId"), _column("Endpoint", ".status.endpoint"), REASON, AGE),
)
KINDS: dict[str, Kind] = {k.kind: k for k in (FINETUNE, BATCHINFERENCE, LLMSERVICE)}

__all__ = ["API_VERSION", "BATCHINFERENCE", "CATEGORY", "FINETUNE", "GROUP", "KINDS", "LLMSERVICE", "VERSION", "Kind"]
