"""BatchInference reconcile: wait for a referenced FineTune, run the RayJob, fold metrics into status."""

from __future__ import annotations

import time
from typing import Any

from ..api.batchinference import BatchInferenceSpec
from ..builders import batchinference as builder
from ..builders.common import Owner
from ..status import DEPENDENCY_GRACE_SECONDS, Grace, Verdict, within_grace
from .engine import Engine, Outcome
from .jobs import job_outcome, simulated_mark, validate

METRIC_KEYS = ("rows", "exactMatch", "functionNameAccuracy", "attributeF1")


def result_fields(report: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    metrics = report.get("metrics")
    if isinstance(metrics, dict):
        numbers = {k: metrics[k] for k in METRIC_KEYS if isinstance(metrics.get(k), (int, float))}
        if numbers:
            fields["metrics"] = {**numbers, **simulated_mark(metrics)}
    if report.get("state") == "Succeeded" and report.get("outputURI"):
        fields["outputURI"] = report["outputURI"]
    return fields


def fine_tune_model(engine: Engine, body: dict[str, Any], ref: str) -> tuple[builder.ResolvedModel | None,
                                                                              Verdict | None]:
    """The FineTune's base model and adapter, or why we cannot have them yet."""
    namespace = body["metadata"]["namespace"]
    ft = engine.caches.owners.get(("FineTune", namespace, ref))
    if ft is None:
        missing = Verdict("Waiting", "stalled", "FineTuneNotFound",
                          f"FineTune {ref} (spec.model.fineTuneRef) does not exist in namespace {namespace}")
        minutes = int(DEPENDENCY_GRACE_SECONDS // 60)
        return None, within_grace(missing, Grace(body["metadata"].get("creationTimestamp"), DEPENDENCY_GRACE_SECONDS),
                                  time.time(), "Waiting for it to be created",
                                  f"It was not created within {minutes} minutes of this BatchInference",
                                  "Create it, or fix the reference")
    status = ft.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Failed":
        return None, Verdict("Pending", "stalled", "FineTuneFailed",
                             f"FineTune {ref} failed: {status.get('message', '')}")
    adapter = (status.get("adapter") or {}).get("uri")
    if phase != "Succeeded" or not adapter:
        return None, Verdict("Waiting", "progressing", "WaitingForFineTune",
                             f"waiting for FineTune {ref} to produce its adapter (it is {phase}: "
                             f"{status.get('message', '')})")
    return builder.ResolvedModel(ft["spec"]["baseModel"]["source"], adapter, adapter.rstrip("/").rsplit("/", 1)[-1],
                                 (status.get("adapter") or {}).get("rank")), None


def reconcile(engine: Engine, body: dict[str, Any]) -> Outcome:
    spec, invalid = validate(BatchInferenceSpec, body)
    if invalid:
        return Outcome([], invalid)
    model = builder.resolved_from_spec(spec)
    if model is None:
        model, waiting = fine_tune_model(engine, body, spec.model.fine_tune_ref.name)
        if waiting is not None:
            status = body.get("status") or {}
            if status.get("startTime"):  # already running on the adapter it resolved then
                model = builder.ResolvedModel(status["modelSource"], status.get("adapterURI"))
            else:
                return Outcome([], waiting, requeue_after=waiting.recheck_after)
    extra = {"modelSource": model.source, **({"adapterURI": model.adapter_uri} if model.adapter_uri else {})}
    return job_outcome(engine, body, spec, "BatchInference", lambda b, ctx: builder.build(b, ctx, model),
                       builder.names(Owner.of(body)).ray, result_fields, extra)

