"""A RayService (KubeRay's status) -> an LLMService's verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .conditions import Verdict
from .pods import RAY_NODE_TYPE_LABEL, PodProblem, pod_problem_verdict, unschedulable_verdict

# ---- KubeRay RayService -> verdict --------------------------------------------------------------------------
RAY_SERVICE_WAITING = ("Initializing", "ZeroServeEndpoints")
"""KubeRay's RayService Ready=False reasons (KubeRay 1.5), passed on while the service starts or has lost its
endpoints. (Its InitializingTimeout needs an annotation the operator does not set.)"""
SERVING = "Serving"
SCALED_TO_ZERO = "ScaledToZero"
SCALING_UP_FROM_ZERO = "ScalingUpFromZero"
NODE_POOL_HINT = "Check the accelerator's node pool, or change spec.resources"


@dataclass(frozen=True)
class ZeroScaling:
    """What reading a service with autoscaling.minReplicas 0 needs besides the RayService."""

    delay_seconds: int
    """Seconds without a request before the last replica stops."""
    running_workers: int
    """GPU worker pods running (not being deleted)."""
    starting_workers: tuple[str, ...]
    """Names of GPU worker pods that exist but do not run yet."""
    previous_reason: str = ""
    """The reason the status gave last: a scale-up from zero goes on while the model loads on a running worker."""


def zero_scaling(pods: list[Mapping[str, Any]], delay_seconds: int, previous_reason: str) -> ZeroScaling:
    """The GPU worker pods among a service's Ray pods, counted for the scale-to-zero reading."""
    running, starting = 0, []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (meta.get("labels") or {}).get(RAY_NODE_TYPE_LABEL) != "worker" or meta.get("deletionTimestamp"):
            continue
        if (pod.get("status") or {}).get("phase") == "Running":
            running += 1
        else:
            starting.append(meta.get("name", "?"))
    return ZeroScaling(delay_seconds, running, tuple(starting), previous_reason)


def _zero_verdict(apps: Mapping[str, Any], zero: ZeroScaling, problems: list[PodProblem], now: float | None,
                  suffix: str) -> Verdict | None:
    """ScaledToZero / ScalingUpFromZero for a serving RayService, None when replicas run as usual. Both keep
    Ready=True and Reconciling=False: the endpoint answers, and traffic, not a spec change, moves the replica
    count (a GitOps sync must not wait on a cold start, nor flip with the traffic). A scale-up that cannot get
    its pod going (no node after the grace period, an image or driver problem) is Stalled: requests would wait
    for nothing."""
    upscaling = any(d.get("status") == "UPSCALING" for app in apps.values()
                    for d in (app.get("serveDeploymentStatuses") or {}).values())
    if not upscaling and zero.running_workers == 0 and not zero.starting_workers:
        return Verdict("Ready", "ready", SCALED_TO_ZERO, (
            f"scaled to zero: no model replica or GPU worker runs after {zero.delay_seconds}s without a request; "
            "the first request starts one and waits for it (a cold start: a GPU node if none is free, the worker "
            "pod, the model load)") + suffix)
    from_zero = zero.running_workers == 0 or zero.previous_reason == SCALING_UP_FROM_ZERO
    if not from_zero or not (upscaling or (zero.starting_workers and zero.running_workers == 0)):
        return None
    blocked = pod_problem_verdict(problems, now, NODE_POOL_HINT, "Check spec.image")
    if blocked is not None and blocked.state == "stalled":
        return Verdict(blocked.phase, blocked.state, blocked.reason,
                       f"scaling up from zero: {blocked.message}" + suffix)
    if zero.running_workers:
        step = "the GPU worker runs and the model replica is starting (model download, engine start)"
    elif zero.starting_workers:
        step = f"GPU worker pod {zero.starting_workers[0]} is starting"
    else:
        step = "the Ray autoscaler is adding a GPU worker pod"
    waiting = f" ({blocked.message})" if blocked is not None else ""
    return Verdict("Ready", "ready", SCALING_UP_FROM_ZERO, (
        f"scaling up from zero: a request arrived and {step}{waiting}; requests wait until the replica is up (a "
        "cold start)") + suffix, recheck_after=blocked.recheck_after if blocked is not None else None)


def service_verdict(ray_service: Mapping[str, Any] | None, adapters_summary: str, problems: list[PodProblem],
                    upgrade_strategy: str, now: float | None = None, zero: ZeroScaling | None = None) -> Verdict:
    """Map a RayService's conditions (Ready, UpgradeInProgress) and application statuses. `zero`: the service
    may scale to zero (autoscaling.minReplicas 0), and what its worker pods are doing."""
    suffix = f"; {adapters_summary}" if adapters_summary else ""
    if ray_service is None:
        return Verdict("Pending", "progressing", "Creating", "creating the RayService" + suffix)
    status = ray_service.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get("Ready", {})
    upgrading = conditions.get("UpgradeInProgress", {}).get("status") == "True"
    apps = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    failed = {name: app for name, app in apps.items() if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY")}
    if upgrading:
        if upgrade_strategy == "NewCluster":
            cannot_fit = unschedulable_verdict(
                problems, now, "Add GPU nodes or set spec.upgradeStrategy to None; the current cluster keeps serving",
                phase="Upgrading", reason="UpgradeCannotFit",
                lead="the NewCluster upgrade needs a second Ray cluster (twice the GPUs) and ")
            if cannot_fit is not None:
                return Verdict(cannot_fit.phase, cannot_fit.state, cannot_fit.reason, cannot_fit.message + suffix,
                               recheck_after=cannot_fit.recheck_after)
        return Verdict("Upgrading", "progressing", "UpgradeInProgress",
                       "a new Ray cluster is starting; traffic moves to it once it is ready" + suffix)
    if failed:
        name, app = next(iter(failed.items()))
        return Verdict("Failed", "stalled", "ServeApplicationFailed",
                       f"Serve application {name} is {app.get('status')}: {app.get('message', '')}"[:2000])
    if ready.get("status") == "True":
        if zero is not None and apps and (found := _zero_verdict(apps, zero, problems, now, suffix)) is not None:
            return found
        return Verdict("Ready", "ready", SERVING, "serving" + suffix)
    blocked = pod_problem_verdict(problems, now, NODE_POOL_HINT, "Check spec.image")
    if blocked is not None:
        return blocked
    reason = ready.get("reason") or "Initializing"
    return Verdict("Pending", "progressing", reason,
                   f"waiting for the Ray cluster and Serve application ({reason})" + suffix)
