"""LLMService reconcile: resolve adapters (FineTunes, gates), render the RayService, map its status."""

from __future__ import annotations

import time
from typing import Any

from ..api.llmservice import LLMServiceSpec
from ..builders import llmservice as builder
from ..builders.common import Owner, UnknownAccelerator
from ..builders.serving import ServeConfigError, resolve_adapters
from ..status import Verdict, pod_problems, service_verdict
from .engine import Engine, Outcome
from .jobs import validate


def _statuses(engine: Engine, kind: str, namespace: str, names: set[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        body = engine.caches.owners.get((kind, namespace, name))
        if body is not None:
            out[name] = body.get("status") or {}
    return out


def reconcile(engine: Engine, body: dict[str, Any]) -> Outcome:
    spec, invalid = validate(LLMServiceSpec, body)
    if invalid:
        return Outcome([], invalid, ray_kind="RayService")
    owner = Owner.of(body)
    names = builder.names(owner)
    adapters = spec.adapters or []
    plan = resolve_adapters(
        spec,
        _statuses(engine, "FineTune", owner.namespace, {a.fine_tune_ref.name for a in adapters if a.fine_tune_ref}),
        _statuses(engine, "BatchInference", owner.namespace,
                  {a.gate.batch_inference_ref.name for a in adapters if a.gate}))
    fields: dict[str, Any] = {"rayServiceName": names.ray, "adapters": plan.states,
                              "endpoint": builder.endpoint(owner, engine.ctx.settings), "models": plan.models}
    if not adapters:
        del fields["adapters"]
    if spec.suspend:
        return Outcome([], Verdict("Suspended", "suspended", "Suspended",
                                   "spec.suspend is true: the RayService is removed; set it to false to serve again",
                                   {k: v for k, v in fields.items() if k != "endpoint"}),
                       ray_kind="RayService", delete=[("ray.io/v1", "RayService", names.ray)])
    try:
        children = builder.build(body, engine.ctx, plan)
    except UnknownAccelerator as e:
        return Outcome([], Verdict("Failed", "stalled", "UnknownAccelerator", str(e)), ray_kind="RayService")
    except ServeConfigError as e:
        return Outcome([], Verdict("Failed", "stalled", "InvalidServeConfig", str(e)), ray_kind="RayService")
    uid = body["metadata"]["uid"]
    problems = pod_problems(engine.caches.pods.all(uid))
    verdict = service_verdict(engine.ray_object(uid), plan.summary, problems, spec.upgrade_strategy, time.time())
    reason = verdict.reason
    if verdict.state == "ready" and any(s["state"] != "Serving" for s in plan.states):
        reason = "ServingWithAdaptersPending"
    return Outcome(children, Verdict(verdict.phase, verdict.state, reason, verdict.message, fields),
                   ray_kind="RayService", requeue_after=verdict.recheck_after)

