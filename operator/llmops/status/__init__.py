"""Status: kstatus conditions (Ready / Reconciling / Stalled) and the mapping from KubeRay's child status.

Pure functions: observations in, a `Verdict` out. The handlers turn a verdict into the status they apply.
`WRITTEN` lists every status the operator writes; docs/gitops.md says how GitOps tools read each one, and
tests hold both to the real clients (kstatus and Argo CD's Lua runtime).
"""

from __future__ import annotations

from .conditions import (
    DEPENDENCY_GRACE_SECONDS,
    Grace,
    READY,
    RECONCILING,
    REPORT_GRACE_SECONDS,
    SCALE_UP_GRACE_SECONDS,
    STALLED,
    SUSPENDED,
    Verdict,
    conditions_for,
    rfc3339,
    same_status,
    within_grace,
)
from .pods import (
    DISRUPTIONS,
    DRIVER_FLOOR,
    GPU_DRIVER_TOO_OLD,
    NODE_SHUTDOWN_REASONS,
    PREEMPTED,
    PodProblem,
    RAY_CLUSTER_LABEL,
    RAY_NODE_TYPE_LABEL,
    Retries,
    driver_verdict,
    pod_problem_verdict,
    pod_problems,
    preemption_verdict,
    unschedulable_verdict,
)
from .jobs import (
    NOT_STARTED,
    RAY_JOB_FAILURES,
    job_verdict,
    queued_verdict,
    ray_job_deleted,
    result_report,
    used_retries,
)
from .services import (
    RAY_SERVICE_WAITING,
    SCALED_TO_ZERO,
    SCALING_UP_FROM_ZERO,
    SERVING,
    ZeroScaling,
    service_verdict,
    zero_scaling,
)
from .written import (
    EVERY_KIND,
    JOBS,
    SERVICES,
    WRITTEN,
    Written,
)

__all__ = [
    "DEPENDENCY_GRACE_SECONDS",
    "DISRUPTIONS",
    "DRIVER_FLOOR",
    "EVERY_KIND",
    "GPU_DRIVER_TOO_OLD",
    "Grace",
    "JOBS",
    "NODE_SHUTDOWN_REASONS",
    "NOT_STARTED",
    "PREEMPTED",
    "PodProblem",
    "RAY_CLUSTER_LABEL",
    "RAY_NODE_TYPE_LABEL",
    "RAY_JOB_FAILURES",
    "RAY_SERVICE_WAITING",
    "READY",
    "RECONCILING",
    "REPORT_GRACE_SECONDS",
    "Retries",
    "SCALED_TO_ZERO",
    "SCALE_UP_GRACE_SECONDS",
    "SCALING_UP_FROM_ZERO",
    "SERVICES",
    "SERVING",
    "STALLED",
    "SUSPENDED",
    "Verdict",
    "WRITTEN",
    "Written",
    "ZeroScaling",
    "conditions_for",
    "driver_verdict",
    "job_verdict",
    "pod_problem_verdict",
    "pod_problems",
    "preemption_verdict",
    "queued_verdict",
    "ray_job_deleted",
    "result_report",
    "rfc3339",
    "same_status",
    "service_verdict",
    "unschedulable_verdict",
    "used_retries",
    "within_grace",
    "zero_scaling",
]
