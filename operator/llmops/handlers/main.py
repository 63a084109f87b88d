"""kopf wiring: login, settings and the operator's tasks (one startup hook), and `llmops run`.

kopf runs the operator's life (login, start-up and clean-up, the liveness endpoint, signals); the watches are
our own (handlers/informers.py: why), feeding the caches and the reconcile triggers here. The decisions live in
the per-kind modules and the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from functools import partial
from pathlib import Path
from typing import Any

import kopf

from ..api import GROUP, KINDS, VERSION
from ..builders.common import (CACHE_ROLE, MANAGED_SELECTOR, OWNER_UID_LABEL, PAYLOADS_ROLE, RESULT_ROLE,
                               ROLE_LABEL, BuildContext, load_payloads)
from ..kube import Credentials, Kube
from ..settings import Settings
from .caches import (bind, configmap_entries, controller, job_entries, lost_pod, owner_entries, owner_uid_label,
                     pod_entries, ray_entries)
from .engine import Engine
from .informers import Informers, Watched
from .leader import Leader
from .metrics import serve_metrics

log = logging.getLogger("llmops")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: Any, memo: kopf.Memo, **_: Any) -> None:
    """The engine and its watches, started as one task (behind the Lease with leader election)."""
    options = memo.get("options", {})
    settings.posting.enabled = False          # we post our own Events, one per phase change
    settings.scanning.disabled = True         # no cluster-wide namespace/CRD scans: least rights
    settings.peering.standalone = True        # leader election is the Lease's (handlers/leader.py)
    llmops_settings = Settings.load()
    # Startup runs before kopf's own login: read the same credentials the same way for our requests.
    info = (kopf.login_with_service_account(logger=logger, settings=settings)
            or kopf.login_with_kubeconfig(logger=logger, settings=settings))
    if info is None:
        raise kopf.PermanentError("no API credentials: set KUBECONFIG or run in a pod with a service account")
    credentials = Credentials(server=info.server, token=info.token, ca_path=info.ca_path, ca_data=info.ca_data,
                              cert_path=info.certificate_path, key_path=info.private_key_path,
                              insecure=bool(info.insecure))
    kube = Kube(credentials, llmops_settings.field_manager)
    eng = Engine(kube, BuildContext(settings=llmops_settings, payloads=load_payloads()))
    informers = Informers(kube, watched(eng), options.get("namespaces") or None)
    leader = None
    if options.get("leader_election"):
        leader = Leader(kube, options["leader_election"], lease_namespace(options), identity())
    memo.engine, memo.leader = eng, leader
    memo.operating = asyncio.get_running_loop().create_task(operate(eng, informers, leader, memo))
    if options.get("metrics_port"):
        await serve_metrics(eng, options["metrics_port"])


async def operate(eng: Engine, informers: Informers, leader: Leader | None, memo: kopf.Memo) -> None:
    """Lead (with leader election), then list, trigger and watch until the operator stops or the lead is lost."""
    try:
        if leader is not None:
            await leader.acquire()
            watching = asyncio.create_task(informers.run())
            keeping = asyncio.create_task(leader.keep())
            await asyncio.wait({watching, keeping}, return_when=asyncio.FIRST_COMPLETED)
            watching.cancel()
            if keeping.done():   # lost the Lease: stop writing now, then stop the operator (its pod restarts)
                await eng.kube.close()
                log.error("no longer leading: the operator stops, to wait for the Lease again as a new process")
                memo.outcome["exit_code"] = 1
                memo.stop.set()
                return
            keeping.cancel()
            watching.result()
        else:
            await informers.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("the operator stops")
        memo.outcome["exit_code"] = 1
        memo.stop.set()


def lease_namespace(options: dict) -> str:
    """Where the Lease lives: the flag, else the pod's namespace, else that of the service account, else
    default."""
    if options.get("lease_namespace"):
        return options["lease_namespace"]
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("operating") is not None:
        memo.operating.cancel()
    if memo.get("leader") is not None:
        await memo.leader.release()
    if memo.get("engine") is not None:
        await memo.engine.kube.close()


# ---- what is watched: one index per resource, its keys tagged by what they answer --------------------------
def watched(eng: Engine) -> list[Watched]:
    """Every watched resource, the engine's caches pointed at their indexes. Server-side label selectors: the API
    server sends only our children, not every ConfigMap and Pod."""
    managed = MANAGED_SELECTOR
    child = partial(on_child, eng)
    watches = [
        *(Watched(f"{GROUP}/{VERSION}", k.kind, partial(owner_entries, k.kind),
                  trigger=partial(on_owner, eng, k.kind)) for k in KINDS.values()),
        Watched("ray.io/v1", "RayJob", partial(ray_entries, "RayJob"), managed, child),
        Watched("ray.io/v1", "RayService", partial(ray_entries, "RayService"), managed, child),
        Watched("v1", "ConfigMap", configmap_entries,
                f"{managed},{ROLE_LABEL} in ({RESULT_ROLE},{PAYLOADS_ROLE},{CACHE_ROLE})", child),
        Watched("v1", "Pod", pod_entries, OWNER_UID_LABEL, child),
        Watched("batch/v1", "Job", job_entries, managed, child),
    ]
    # our kinds in KINDS' order, then the children's in bind's: RayJobs, RayServices, ConfigMaps, Pods, Jobs
    bind(eng.caches, [w.index for w in watches[:len(KINDS)]], *(w.index for w in watches[len(KINDS):]))
    return watches


# ---- triggers ---------------------------------------------------------------------------------------------
def on_owner(eng: Engine, kind: str, type: str | None, body: dict) -> None:
    """One of our resources: reconcile it, and what waits on it. `type` None: listed at a start."""
    meta = body["metadata"]
    key = (kind, meta["namespace"], meta["name"])
    # Listed, and its status already speaks of its spec: it waits behind the resources that need work (created,
    # or changed, while no operator ran).
    listed = type is None and settled(body)
    if type == "DELETED":
        eng.forget(key, meta.get("uid"))
    elif not eng.is_echo(body):
        eng.schedule(key, listed)
    eng.schedule_dependents(key, listed)


def settled(body: Any) -> bool:
    """A status for the resource's current generation: an operator reconciled this spec before."""
    status = body.get("status") or {}
    return status.get("observedGeneration") == (body.get("metadata") or {}).get("generation", 1)


def _uid_of_owner(body: dict) -> str | None:
    ref = controller(body)
    return ref["uid"] if ref else (owner_uid_label(body) or None)


def on_child(eng: Engine, type: str | None, body: dict) -> None:
    """A child changed: reconcile its owner (the shared payload sources have none)."""
    if ((body.get("metadata") or {}).get("labels") or {}).get(ROLE_LABEL) == PAYLOADS_ROLE or eng.is_echo(body):
        return
    uid = _uid_of_owner(body)
    key = eng.caches.owner_keys.get(uid) if uid else None
    if key is not None:
        if body.get("kind") == "Pod" and (lost := lost_pod(body)):
            eng.caches.lost_pods[uid] = lost
        eng.schedule(tuple(key), type is None)


# ---- entry point ------------------------------------------------------------------------------------------
def run(*, namespaces: list[str], all_namespaces: bool, probe_port: int, metrics_port: int,
        leader_election: str | None, lease_namespace: str | None, log_format: str) -> int:
    kopf.configure(verbose=False, log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(os.environ.get("LLMOPS_LOG_LEVEL", "INFO").upper())
    liveness = f"http://0.0.0.0:{probe_port}/healthz" if probe_port else None

    async def main() -> int:
        memo = kopf.Memo(options={"metrics_port": metrics_port, "namespaces": namespaces,
                                  "leader_election": leader_election, "lease_namespace": lease_namespace},
                         stop=asyncio.Event(), outcome={"exit_code": 0})
        await kopf.operator(clusterwide=all_namespaces, namespaces=namespaces, liveness_endpoint=liveness,
                            standalone=True, memo=memo, stop_flag=memo.stop)
        return memo.outcome["exit_code"]
    return asyncio.run(main())
