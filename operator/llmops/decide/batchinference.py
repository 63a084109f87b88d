"""BatchInference: wait for a referenced FineTune's adapter, run the RayJob, fold its metrics into status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .. import dependencies as deps
from ..api.batchinference import BatchMetrics
from ..api.finetune import FineTuneStatus
from ..builders import batchinference as builder
from ..builders.common import BuildContext
from ..status import DEPENDENCY_GRACE_SECONDS, DEPENDENCY_RECHECK_SECONDS, Grace, Verdict, within_grace
from . import modelcache
from .common import Outcome, invalid_spec
from .jobs import JobObservation, decide_job, simulated_mark

METRIC_KEYS = ("rows", "exactMatch", "functionNameAccuracy", "attributeF1")


@dataclass(frozen=True)
class FineTuneSeen:
    """The FineTune spec.model.fineTuneRef names, as the BatchInference reads it."""

    status: FineTuneStatus
    base_model: str | None = None   # its spec.baseModel.source (None: its spec is invalid)


@dataclass(frozen=True)
class BatchInferenceObservation(JobObservation):
    fine_tune: FineTuneSeen | None = None   # the FineTune spec.model.fineTuneRef names (None: not there)
    created: str | None = None              # the BatchInference's creationTimestamp


def result_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    metrics = report.get("metrics")
    if isinstance(metrics, dict):
        numbers = {k: metrics[k] for k in METRIC_KEYS if isinstance(metrics.get(k), (int, float))}
        if numbers:
            fields["metrics"] = BatchMetrics.model_validate({**numbers, **simulated_mark(metrics)})
    if report.get("state") == "Succeeded" and report.get("outputURI"):
        fields["output_uri"] = report["outputURI"]
    return fields


def fine_tune_model(obs: BatchInferenceObservation, ref: str) -> tuple[builder.ResolvedModel | None,
                                                                        Verdict | None]:
    """The FineTune's base model and adapter, or why we cannot have them yet."""
    namespace = obs.owner.namespace
    ft = obs.fine_tune
    if ft is None:
        missing = Verdict("Waiting", "stalled", "FineTuneNotFound",
                          f"FineTune {ref} (spec.model.fineTuneRef) does not exist in namespace {namespace}")
        minutes = int(DEPENDENCY_GRACE_SECONDS // 60)
        return None, within_grace(missing, Grace(obs.created, DEPENDENCY_GRACE_SECONDS), obs.now,
                                  "Waiting for it to be created",
                                  f"It was not created within {minutes} minutes of this BatchInference",
                                  "Create it, or fix the reference")
    output = deps.finetune_output(ref, ft.status)
    if output.state == deps.READY and ft.base_model is None:
        output = deps.FineTuneOutput(deps.FAILED, f"FineTune {ref} has an invalid spec")
    if output.state == deps.FAILED:
        return None, Verdict("Pending", "stalled", "FineTuneFailed", output.message)
    if output.state == deps.WAITING:
        progress = ft.status.message if not deps.is_stalled(ft.status) else ""
        return None, Verdict("Waiting", "progressing", "WaitingForFineTune",
                             f"waiting for the adapter: {output.message}" + (f" ({progress})" if progress else ""),
                             recheck_after=DEPENDENCY_RECHECK_SECONDS)
    return builder.ResolvedModel.of_finetune(ft.base_model, output.uri, output.rank), None


def decide(obs: BatchInferenceObservation, ctx: BuildContext) -> Outcome:
    if obs.spec is None:
        return invalid_spec(obs.spec_error)
    spec = obs.spec
    model = builder.resolved_from_spec(spec)
    if model is None:
        model, waiting = fine_tune_model(obs, spec.model.fine_tune_ref.name)
        if waiting is not None:
            if obs.status.start_time and obs.status.model_source:   # running on the adapter resolved then
                model = builder.ResolvedModel(obs.status.model_source, obs.status.adapter_uri)
            else:
                return Outcome([], waiting, requeue_after=waiting.recheck_after)
    waiting, children, cache = modelcache.stage(obs.cache, obs.owner, obs.status,
                                                builder.cached_model(obs.owner, spec, model), "spec.model.cache",
                                                spec, builder.image(spec, ctx), ctx, obs.now)
    if waiting is not None:
        return Outcome(children, waiting, requeue_after=waiting.recheck_after)
    extra = {"model_source": model.source, **({"adapter_uri": model.adapter_uri} if model.adapter_uri else {})}
    return modelcache.with_cache_status(decide_job(
        obs, ctx, "BatchInference", builder.names(obs.owner).ray,
        lambda owner, spec, ctx: builder.build(owner, spec, ctx, model), result_fields, extra), cache)
