"""Every status the operator writes; docs/gitops.md says how GitOps tools read each one."""

from __future__ import annotations

from dataclasses import dataclass

from .jobs import RAY_JOB_FAILURES
from .pods import CONTAINER_CONFIG_FAILED, GPU_DRIVER_TOO_OLD, PREEMPTED
from .services import RAY_SERVICE_WAITING, SCALED_TO_ZERO, SCALING_UP_FROM_ZERO


@dataclass(frozen=True)
class Written:
    """One status the operator writes: a phase, a state (which conditions are True) and a reason, for some kinds."""

    kinds: tuple[str, ...]
    phase: str
    state: str
    reason: str


JOBS = ("FineTune", "BatchInference")
SERVICES = ("LLMService",)
EVERY_KIND = JOBS + SERVICES

WRITTEN: tuple[Written, ...] = (
    # any kind
    Written(EVERY_KIND, "Pending", "progressing", "Creating"),
    Written(EVERY_KIND, "Pending", "progressing", "WaitingForPreviousRun"),
    Written(EVERY_KIND, "Pending", "progressing", "RetryingAfterErrors"),   # transient errors that keep coming
    Written(EVERY_KIND, "Pending", "progressing", "Unschedulable"),   # within SCALE_UP_GRACE_SECONDS
    Written(EVERY_KIND, "Pending", "stalled", "Unschedulable"),
    Written(EVERY_KIND, "Pending", "stalled", "ImagePullFailed"),
    Written(EVERY_KIND, "Pending", "stalled", GPU_DRIVER_TOO_OLD),
    Written(EVERY_KIND, "Pending", "stalled", CONTAINER_CONFIG_FAILED),   # a missing Secret, a root image
    Written(EVERY_KIND, "Pending", "stalled", "CRDOutdated"),   # a field the operator writes is not in a CRD
    Written(EVERY_KIND, "Pending", "stalled", "CRDMissing"),   # KubeRay's CRDs are not installed
    Written(EVERY_KIND, "Pending", "stalled", "QuotaExceeded"),   # a ResourceQuota refuses a child
    Written(EVERY_KIND, "Pending", "stalled", "Forbidden"),   # RBAC refuses the operator a child
    Written(EVERY_KIND, "Suspended", "suspended", "Suspended"),
    Written(EVERY_KIND, "Failed", "stalled", "InvalidSpec"),
    Written(EVERY_KIND, "Failed", "stalled", "UnknownAccelerator"),
    Written(EVERY_KIND, "Failed", "stalled", "ApplyFailed"),
    # with a model cache (spec's model .cache), until the model is in its claim
    Written(EVERY_KIND, "Pending", "progressing", "CachingModel"),
    Written(EVERY_KIND, "Failed", "stalled", "ModelCacheFailed"),
    # FineTune and BatchInference: one RayJob each
    Written(JOBS, "Pending", "progressing", "RayClusterStarting"),
    Written(JOBS, "Pending", "stalled", "PodsRefused"),   # KubeRay cannot create a Ray pod
    Written(JOBS, "Queued", "progressing", "Queued"),   # with spec.queueName, until Kueue admits it
    Written(JOBS, "Running", "progressing", "JobRunning"),
    Written(JOBS, "Running", "progressing", "Retrying"),
    Written(JOBS, "Running", "progressing", PREEMPTED),
    Written(("FineTune",), "Running", "progressing", "Resuming"),
    Written(JOBS, "Running", "progressing", "CollectingResult"),
    Written(JOBS, "Succeeded", "ready", "Succeeded"),
    Written(JOBS, "Failed", "stalled", "PayloadFailed"),
    Written(JOBS, "Failed", "stalled", "NoResultReported"),
    Written(JOBS, "Failed", "stalled", "RayJobInvalid"),
    Written(JOBS, "Failed", "stalled", "RayJobDeleted"),
    Written(JOBS, "Failed", "stalled", "JobFailed"),
    *(Written(JOBS, "Failed", "stalled", reason) for reason in RAY_JOB_FAILURES),
    # BatchInference with spec.model.fineTuneRef
    Written(("BatchInference",), "Waiting", "progressing", "WaitingForFineTune"),
    Written(("BatchInference",), "Waiting", "progressing", "FineTuneNotFound"),   # within DEPENDENCY_GRACE_SECONDS
    Written(("BatchInference",), "Waiting", "stalled", "FineTuneNotFound"),
    Written(("BatchInference",), "Pending", "stalled", "FineTuneFailed"),
    # LLMService: one RayService
    *(Written(SERVICES, "Pending", "progressing", reason) for reason in RAY_SERVICE_WAITING),
    Written(SERVICES, "Ready", "ready", "Serving"),
    Written(SERVICES, "Ready", "ready", "ServingWithAdaptersPending"),
    Written(SERVICES, "Ready", "ready", SCALED_TO_ZERO),          # autoscaling.minReplicas 0, no replica running
    Written(SERVICES, "Ready", "ready", SCALING_UP_FROM_ZERO),    # a request is waiting for the first replica
    Written(SERVICES, "Upgrading", "progressing", "UpgradeInProgress"),
    Written(SERVICES, "Upgrading", "progressing", "UpgradeCannotFit"),   # within SCALE_UP_GRACE_SECONDS
    Written(SERVICES, "Upgrading", "stalled", "UpgradeCannotFit"),
    Written(SERVICES, "Failed", "stalled", "ServeApplicationFailed"),
    Written(SERVICES, "Failed", "stalled", "InvalidServeConfig"),
    # LLMService with spec.expose, while an API it needs is not served (nothing is exposed then)
    Written(SERVICES, "Pending", "stalled", "GatewayAPIMissing"),
    Written(SERVICES, "Pending", "stalled", "ApiKeyPolicyMissing"),
)
"""Every (phase, state, reason) the operator writes, by kind. A unit test checks it against the code's own
verdicts; docs/gitops.md has a row for each, and the contract test holds the real clients to those rows."""
