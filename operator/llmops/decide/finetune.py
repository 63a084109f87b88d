"""FineTune: render the RayJob, map it and the payload's report (the adapter, the training figures) to status."""

from __future__ import annotations

from typing import Any, Mapping

from ..api.finetune import AdapterStatus, TrainMetrics
from ..builders import finetune as builder
from ..builders.common import BuildContext
from . import modelcache
from .common import Outcome, invalid_spec
from .jobs import JobObservation, decide_job, simulated_mark


def result_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    adapter = report.get("adapter")
    if isinstance(adapter, dict) and adapter.get("uri"):
        fields["adapter"] = AdapterStatus.model_validate(
            {k: adapter[k] for k in ("uri", "baseModel", "rank") if adapter.get(k) is not None})
    metrics = report.get("metrics")
    if isinstance(metrics, dict):
        keys = ("trainLoss", "evalLoss", "trainRuntimeSeconds", "trainSamplesPerSecond")
        numbers = {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}
        if numbers:
            fields["metrics"] = TrainMetrics.model_validate({**numbers, **simulated_mark(metrics)})
    return fields


def decide(obs: JobObservation, ctx: BuildContext) -> Outcome:
    if obs.spec is None:
        return invalid_spec(obs.spec_error)
    waiting, children, cache = modelcache.stage(obs.cache, obs.owner, obs.status,
                                                builder.cached_model(obs.owner, obs.spec), "spec.baseModel.cache",
                                                obs.spec, builder.image(obs.spec, ctx), ctx, obs.now)
    if waiting is not None:
        return Outcome(children, waiting, requeue_after=waiting.recheck_after)
    return modelcache.with_cache_status(decide_job(obs, ctx, "FineTune", builder.names(obs.owner).ray,
                                                   builder.build, result_fields), cache)
