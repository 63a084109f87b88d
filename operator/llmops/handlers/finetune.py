"""FineTune reconcile: validate, render the children, map the RayJob and the payload's report to status."""

from __future__ import annotations

from typing import Any

from ..api.finetune import FineTuneSpec
from ..builders import finetune as builder
from ..builders.common import Owner
from .engine import Engine, Outcome
from .jobs import job_outcome, simulated_mark, validate


def result_fields(report: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    adapter = report.get("adapter")
    if isinstance(adapter, dict) and adapter.get("uri"):
        fields["adapter"] = {k: adapter[k] for k in ("uri", "baseModel", "rank") if adapter.get(k) is not None}
    metrics = report.get("metrics")
    if isinstance(metrics, dict):
        keys = ("trainLoss", "evalLoss", "trainRuntimeSeconds", "trainSamplesPerSecond")
        numbers = {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}
        if numbers:
            fields["metrics"] = {**numbers, **simulated_mark(metrics)}
    return fields


def reconcile(engine: Engine, body: dict[str, Any]) -> Outcome:
    spec, invalid = validate(FineTuneSpec, body)
    if invalid:
        return Outcome([], invalid)
    return job_outcome(engine, body, spec, "FineTune", builder.build, builder.names(Owner.of(body)).ray,
                       result_fields)
