"""On-demand reads of what the watches do not cover: asked only while a resource needs the answer, then decided
on again."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..builders.common import WORKLOAD_API, WORKLOAD_JOB_UID_LABEL
from ..kube import ApiError, with_retries
from .caches import plain

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("llmops")


async def workload_changed(engine: Engine, body: dict[str, Any], ray_uid: str) -> bool:
    """Read the Workload Kueue made for a queued RayJob (read on demand, not watched: only queued jobs need it, and
    a cluster without Kueue has no such resource); True when its conditions changed."""
    try:
        found = await with_retries(lambda: engine.kube.list(
            WORKLOAD_API, "Workload", body["metadata"]["namespace"], f"{WORKLOAD_JOB_UID_LABEL}={ray_uid}"))
    except ApiError as e:
        if e.status != 404:
            raise
        found = []   # no Kueue in this cluster: the status says the job waits for a Workload that never comes
    workload = plain(found[0], spec=False) if found else None
    before = engine.workloads.get(ray_uid)
    engine.workloads[ray_uid] = workload
    return ((before or {}).get("status") or {}) != ((workload or {}).get("status") or {})


async def cluster_changed(engine: Engine, body: dict[str, Any], name: str) -> bool:
    """Why KubeRay cannot create a Ray cluster's pods (its RayCluster's ReplicaFailure condition: a Pod Security
    level or a quota refusing them), read for a job whose cluster stays short of pods: those refusals make no pod
    and so no event the operator watches. True when the answer changed."""
    uid = body["metadata"]["uid"]
    try:
        found = await with_retries(lambda: engine.kube.find("ray.io/v1", "RayCluster", body["metadata"]["namespace"],
                                                            name))
    except ApiError as e:
        if e.status not in (403, 404):
            raise
        log.info("cannot read RayCluster %s (%s): its pods' problems go unreported", name, e)
        found = None   # a chart from before this read was granted, or the cluster already gone
    why = next((c.get("message") or c.get("reason") or "" for c in ((found or {}).get("status") or {}).get(
        "conditions") or [] if c.get("type") == "ReplicaFailure" and c.get("status") == "True"), "")
    before = engine.clusters.get(uid)
    engine.clusters[uid] = (name, why)
    return before != (name, why)
