"""LLMService: resolve adapters (FineTunes, gates), render the RayService and its route, map its status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..api.batchinference import BatchInferenceStatus
from ..api.finetune import FineTuneStatus
from ..api.llmservice import AdapterState, LLMServiceStatus
from ..builders import llmservice as builder
from ..builders.common import BuildContext, UnknownAccelerator
from ..builders.exposure import ABSENT_SECONDS, HTTP_ROUTE, SECURITY_POLICY, Api
from ..builders.serving import WAITING, ServeConfigError, resolve_adapters, routing
from ..status import DEPENDENCY_RECHECK_SECONDS, SERVING, PodProblem, Verdict, ZeroScaling, service_verdict
from . import modelcache
from .common import Observation, Outcome, invalid_spec


@dataclass(frozen=True)
class ServiceObservation(Observation):
    """What a service's reconcile reads, all of it, as handlers/observe.py found it in the caches."""

    # name -> status, of each FineTune an adapter names and of each BatchInference a gate names (absent: not there)
    fine_tunes: Mapping[str, FineTuneStatus] = field(default_factory=dict)
    gates: Mapping[str, BatchInferenceStatus] = field(default_factory=dict)
    unserved: tuple[Api, ...] = ()   # the APIs spec.expose needs that the API server does not serve
    ray: Mapping[str, Any] | None = None   # the RayService
    problems: tuple[PodProblem, ...] = ()  # its pods' problems
    zero: ZeroScaling | None = None   # its GPU workers counted, when autoscaling.minReplicas is 0


def _missing(unserved: tuple[Api, ...]) -> Verdict | None:
    """Stalled when an API spec.expose needs is not served; nothing is exposed then (never without its key check)."""
    if not unserved:
        return None
    api = unserved[0]
    reason = "GatewayAPIMissing" if api is HTTP_ROUTE else "ApiKeyPolicyMissing"
    return Verdict("Pending", "stalled", reason, (
        f"{api.needed_for} needs {api.kind} ({api.group_version}), which this cluster does not serve: "
        f"{api.install_hint}. Nothing is exposed until then; the in-cluster endpoint is unaffected"),
        recheck_after=ABSENT_SECONDS)


def _removals(status: LLMServiceStatus, keep_route: bool, keep_policy: bool) -> list[tuple[str, str, str]]:
    """Exposure objects written before that the spec no longer wants: the route first, then its policy."""
    out = []
    if status.route_name and not keep_route:
        out.append((HTTP_ROUTE.group_version, HTTP_ROUTE.kind, status.route_name))
    if status.api_key_policy_name and not keep_policy:
        out.append((SECURITY_POLICY.group_version, SECURITY_POLICY.kind, status.api_key_policy_name))
    return out


def decide(obs: ServiceObservation, ctx: BuildContext) -> Outcome:
    spec, owner, status = obs.spec, obs.owner, obs.status
    if spec is None:
        return invalid_spec(obs.spec_error, ray_kind="RayService")
    names = builder.names(owner)
    adapters = spec.adapters or []
    plan = resolve_adapters(spec, obs.fine_tunes, obs.gates)
    fields: dict[str, Any] = {"ray_service_name": names.ray, "models": plan.models, "routing": routing(spec)}
    if adapters:
        fields["adapters"] = [AdapterState.model_validate(state) for state in plan.states]
    if spec.suspend:
        return Outcome([], Verdict("Suspended", "suspended", "Suspended",
                                   "spec.suspend is true: the RayService is removed; set it to false to serve again",
                                   LLMServiceStatus(**fields)),
                       ray_kind="RayService", delete=[*_removals(status, False, False),
                                                      ("ray.io/v1", "RayService", names.ray)])
    waiting, cache_children, cache = modelcache.stage(obs.cache, owner, status, builder.cached_model(owner, spec),
                                                      "spec.model.cache", spec, builder.image(spec, ctx), ctx,
                                                      obs.now)
    if waiting is not None:
        waiting = waiting.with_fields(LLMServiceStatus(**fields))
        return Outcome(cache_children, waiting, ray_kind="RayService", requeue_after=waiting.recheck_after)
    fields["endpoint"] = builder.endpoint(owner, ctx.settings)
    if cache is not None:
        fields["model_cache"] = cache
    missing = _missing(obs.unserved)
    exposed = spec.expose is not None and missing is None
    if exposed:
        fields["route_name"] = names.ray
        if spec.expose.api_key is not None:
            fields["api_key_policy_name"] = names.ray
    removals = _removals(status, "route_name" in fields, "api_key_policy_name" in fields)
    try:
        children = builder.build(owner, spec, ctx, plan, expose=exposed)
    except UnknownAccelerator as e:
        return Outcome([], Verdict("Failed", "stalled", "UnknownAccelerator", str(e)), ray_kind="RayService")
    except ServeConfigError as e:
        return Outcome([], Verdict("Failed", "stalled", "InvalidServeConfig", str(e)), ray_kind="RayService")
    verdict = service_verdict(obs.ray, plan.summary, list(obs.problems), spec.upgrade_strategy, obs.now, obs.zero)
    reason = verdict.reason
    if verdict.reason == SERVING and any(s["state"] != "Serving" for s in plan.states):
        reason = "ServingWithAdaptersPending"
    served = LLMServiceStatus(**fields)
    if missing is not None:
        return Outcome(children, Verdict(missing.phase, missing.state, missing.reason,
                                         f"{missing.message} ({verdict.message})", served),
                       ray_kind="RayService", delete=removals, requeue_after=missing.recheck_after)
    recheck = verdict.recheck_after
    if any(s["state"] in WAITING for s in plan.states):
        recheck = min(recheck or DEPENDENCY_RECHECK_SECONDS, DEPENDENCY_RECHECK_SECONDS)
    return Outcome(children, Verdict(verdict.phase, verdict.state, reason, verdict.message, served),
                   ray_kind="RayService", delete=removals, requeue_after=recheck)
