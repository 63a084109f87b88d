"""observe: one typed observation per kind, read from the caches (and what this process wrote and the watches do
not show yet). The spec is validated here, once; deciding is left to `llmops.decide`."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Mapping

from ..api import KINDS
from ..api.batchinference import BatchInferenceSpec, BatchInferenceStatus
from ..api.finetune import FineTuneSpec, FineTuneStatus
from ..api.llmservice import LLMServiceSpec, LLMServiceStatus
from ..api.validation import validated
from ..builders.common import Owner
from ..builders.exposure import HTTP_ROUTE, SECURITY_POLICY, needed_apis
from ..decide.batchinference import BatchInferenceObservation, FineTuneSeen
from ..decide.common import CacheSeen
from ..decide.jobs import JobObservation, status_reason
from ..decide.llmservice import ServiceObservation
from .caches import is_download, ray_pods
from ..status import (PODS_REFUSED, RAY_CLUSTER_LABEL, PodProblem, pod_problems, queued_verdict, result_report,
                      zero_scaling)

if TYPE_CHECKING:
    from .engine import Engine


def _job(engine: Engine, observation: JobObservation) -> JobObservation:
    """`observation` with the RayJob's side filled in (for a valid spec whose run has not finished)."""
    if observation.spec is None or observation.finished:
        return observation
    uid = observation.owner.uid
    ray = engine.ray_object(uid)
    report = result_report(engine.caches.results.get(uid))
    current = ((ray or {}).get("status") or {}).get("rayClusterName")
    # Pods of an earlier attempt's cluster, still being deleted, say nothing about this attempt.
    pods = [p for p in ray_pods(engine.caches.pods.all(uid))
            if not current or (p["metadata"].get("labels") or {}).get(RAY_CLUSTER_LABEL, current) == current]
    problems = pod_problems(pods)
    lost = engine.caches.lost_pods.get(uid)
    if lost and lost[0] == current and lost[1] not in problems:
        problems.append(lost[1])
    refused = engine.clusters.get(uid)   # (RayCluster, why KubeRay could not create its pods), once read
    if refused and refused[0] == current and refused[1]:
        problems.append(PodProblem(PODS_REFUSED, refused[1], current))
    queued_on = _waiting_in_queue(engine, observation.spec, ray, report)
    return dataclasses.replace(observation, ray=ray, report=report, problems=tuple(problems), queued_on=queued_on,
                               workload=engine.workloads.get(queued_on) if queued_on else None,
                               applied_for=engine.applied_memo_key(uid) if ray is not None else None,
                               ray_pods=len(pods))


def _cache_seen(engine: Engine, body: Mapping[str, Any], spec: Any) -> CacheSeen:
    """The model cache's download, when the spec asks for a cache (the builders decide which field that is)."""
    model = getattr(spec, "base_model", None) or getattr(spec, "model", None)
    if spec is None or getattr(model, "cache", None) is None:
        return CacheSeen()
    uid = body["metadata"]["uid"]
    return CacheSeen(engine.caches.cache_jobs.get(uid), engine.caches.cache_reports.get(uid),
                     tuple(pod_problems([p for p in engine.caches.pods.all(uid) if is_download(p)])))


def _waiting_in_queue(engine: Engine, spec: Any, ray: Mapping[str, Any] | None, report: Mapping[str, Any]) -> str:
    """The uid of the RayJob when it names a Kueue queue and has not started; "" otherwise (and its Workload is
    no longer worth remembering)."""
    uid = ((ray or {}).get("metadata") or {}).get("uid", "")
    if not getattr(spec, "queue_name", None) or not uid or report.get("state") or queued_verdict(
            spec.queue_name, ray, engine.workloads.get(uid)) is None:
        engine.workloads.pop(uid, None)
        return ""
    return uid


def finetune(engine: Engine, body: dict[str, Any]) -> JobObservation:
    spec, error = validated(FineTuneSpec, body)
    return _job(engine, JobObservation(Owner.of(body), FineTuneStatus.read(body.get("status")), spec, error,
                                       time.time(), _cache_seen(engine, body, spec)))


def batchinference(engine: Engine, body: dict[str, Any]) -> BatchInferenceObservation:
    spec, error = validated(BatchInferenceSpec, body)
    meta = body["metadata"]
    ref = spec.model.fine_tune_ref if spec is not None else None
    fine_tune = engine.caches.owners.get(("FineTune", meta["namespace"], ref.name)) if ref else None
    return _job(engine, BatchInferenceObservation(
        Owner.of(body), BatchInferenceStatus.read(body.get("status")), spec, error, time.time(),
        _cache_seen(engine, body, spec), fine_tune=_fine_tune_seen(fine_tune) if fine_tune else None,
        created=meta.get("creationTimestamp")))


def _fine_tune_seen(body: dict[str, Any]) -> FineTuneSeen:
    spec, _ = validated(FineTuneSpec, body)
    return FineTuneSeen(FineTuneStatus.read(body.get("status")), spec.base_model.source if spec else None)


async def prepare_llmservice(engine: Engine, body: dict[str, Any]) -> None:
    """Look up whether the APIs spec.expose needs are served (the watches cannot say)."""
    expose = (body.get("spec") or {}).get("expose")
    if isinstance(expose, dict):
        await engine.discovery.refresh([HTTP_ROUTE, SECURITY_POLICY] if expose.get("apiKey") else [HTTP_ROUTE])


def _statuses(engine: Engine, kind: str, namespace: str, names: set[str]) -> dict[str, Any]:
    """name -> the typed status of each named resource of `kind` that exists."""
    model = KINDS[kind].status_model
    out = {}
    for name in names:
        body = engine.caches.owners.get((kind, namespace, name))
        if body is not None:
            out[name] = model.read(body.get("status"))
    return out


def llmservice(engine: Engine, body: dict[str, Any]) -> ServiceObservation:
    spec, error = validated(LLMServiceSpec, body)
    observation = ServiceObservation(Owner.of(body), LLMServiceStatus.read(body.get("status")), spec, error,
                                     time.time(), _cache_seen(engine, body, spec))
    if spec is None:
        return observation
    namespace, uid = observation.owner.namespace, observation.owner.uid
    adapters = spec.adapters or []
    pods = ray_pods(engine.caches.pods.all(uid))
    return dataclasses.replace(
        observation,
        fine_tunes=_statuses(engine, "FineTune", namespace, {a.fine_tune_ref.name for a in adapters
                                                             if a.fine_tune_ref}),
        gates=_statuses(engine, "BatchInference", namespace, {a.gate.batch_inference_ref.name for a in adapters
                                                              if a.gate}),
        unserved=tuple(api for api in needed_apis(spec.expose) if not engine.discovery.served(api)),
        ray=engine.ray_object(uid), problems=tuple(pod_problems(pods)),
        zero=(zero_scaling(pods, spec.autoscaling.scale_to_zero_delay, status_reason(observation.status))
              if spec.autoscaling.scales_to_zero else None))
