"""kopf wiring: login, settings (one startup hook), watches that feed the caches, and `llmops run`.

Handlers here only translate kopf's callbacks into cache updates and scheduled reconciles; the decisions
live in the per-kind modules and the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from ..api import GROUP, KINDS, VERSION
from ..builders.common import (CACHE_ROLE, MANAGED_BY, OWNER_UID_LABEL, PAYLOADS_ROLE, RESULT_ROLE, ROLE_LABEL,
                               BuildContext, load_payloads)
from ..kube import Credentials, Kube
from ..settings import Settings
from . import kopf_toggles
from .caches import (bind, configmap_entries, controller, job_entries, lost_pod, owner_entries, owner_uid_label,
                     pod_entries, ray_entries)
from .engine import Engine
from .metrics import serve_metrics

log = logging.getLogger("llmops")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


class NoDiffBase(kopf.DiffBaseStorage):
    """No essence, no diff: kopf builds one (a deep copy of the body) for every event of every watched object, for
    on.create/update/delete handlers, and we register none (every handler here is an index or an on.event)."""

    def build(self, **_: Any) -> None:   # type: ignore[override]
        return None

    def fetch(self, **_: Any) -> None:   # type: ignore[override]
        return None

    def store(self, **_: Any) -> None:
        pass


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: Any, memo: kopf.Memo, **indexes: Any) -> None:
    """Settings, then the engine in the operator's memo (kopf hands each handler a shallow copy of it), its caches
    pointed at the indexes (kopf hands them, empty, to start-up handlers; they fill as the watches list)."""
    options = memo.get("options", {})
    settings.posting.enabled = False          # we post our own Events, one per phase change
    settings.scanning.disabled = True         # no cluster-wide namespace/CRD scans: least rights
    settings.persistence.diffbase_storage = NoDiffBase()
    # Each watch is renewed once per server timeout: one request per watched kind. kopf asks for bookmarks, so the
    # API server keeps even an idle stream alive; a long timeout keeps an idle operator near no requests at all.
    settings.watching.server_timeout = 900
    settings.watching.client_timeout = 960
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    # No worker limit: kopf holds each object's worker until every index has its initial listing, so a limit
    # below the number of watched objects would deadlock the start-up.
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 1.0      # an object's kopf worker goes 1 s after its last event (default 5)
    # Server-side filters: the API server sends only our children, not every ConfigMap and Pod in the cluster.
    managed = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    settings.watching.label_selectors["rayjobs"] = managed
    settings.watching.label_selectors["rayservices"] = managed
    settings.watching.label_selectors["configmaps"] = (f"{managed},{ROLE_LABEL} in "
                                                       f"({RESULT_ROLE},{PAYLOADS_ROLE},{CACHE_ROLE})")
    settings.watching.label_selectors["jobs"] = managed
    settings.watching.label_selectors["pods"] = OWNER_UID_LABEL
    if options.get("peering"):
        settings.peering.name = options["peering"]
        settings.peering.standalone = False
        settings.peering.mandatory = True
        settings.peering.clusterwide = options.get("clusterwide", True)
    else:
        settings.peering.standalone = True
    llmops_settings = Settings.load()
    # Startup runs before kopf's own login: read the same credentials the same way for our writes.
    info = (kopf.login_with_service_account(logger=logger, settings=settings)
            or kopf.login_with_kubeconfig(logger=logger, settings=settings))
    if info is None:
        raise kopf.PermanentError("no API credentials: set KUBECONFIG or run in a pod with a service account")
    credentials = Credentials(server=info.server, token=info.token, ca_path=info.ca_path, ca_data=info.ca_data,
                              cert_path=info.certificate_path, key_path=info.private_key_path,
                              insecure=bool(info.insecure))
    kube = Kube(credentials, llmops_settings.field_manager)
    eng = Engine(kube, BuildContext(settings=llmops_settings, payloads=load_payloads()))
    bind(eng.caches, [indexes[f"index_{k.plural}"] for k in KINDS.values()], indexes["index_rayjobs"],
         indexes["index_rayservices"], indexes["index_configmaps"], indexes["index_pods"], indexes["index_jobs"])
    memo.engine = eng
    if options.get("metrics_port"):
        await serve_metrics(eng, options["metrics_port"])


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("engine") is not None:
        await memo.engine.kube.close()


# ---- indexes: kopf lists every watched kind before it runs any handler ------------------------------------
# One index per watched resource, its keys tagged by what they answer (kopf calls every handler of a resource
# for every event, so each extra handler is paid for each event). All are coroutines: kopf runs plain functions
# in a thread pool, and that hop cost more than the handlers themselves.
def _our_index(kind: str):
    async def index(body: kopf.Body, **_: Any) -> dict:
        return owner_entries(kind, body)
    return index


def _ray_index(kind: str):
    async def index(body: kopf.Body, **_: Any) -> dict:
        return ray_entries(kind, body)
    return index


for _kind in KINDS.values():
    kopf.index(GROUP, VERSION, _kind.plural, id=f"index_{_kind.plural}")(_our_index(_kind.kind))
kopf.index("ray.io", "v1", "rayjobs", labels=MANAGED_BY, id="index_rayjobs")(_ray_index("RayJob"))
kopf.index("ray.io", "v1", "rayservices", labels=MANAGED_BY, id="index_rayservices")(_ray_index("RayService"))


@kopf.index("", "v1", "configmaps", labels={**MANAGED_BY, ROLE_LABEL: kopf.PRESENT})
async def index_configmaps(body: kopf.Body, **_: Any) -> dict | None:
    return configmap_entries(body)


@kopf.index("", "v1", "pods", labels={OWNER_UID_LABEL: kopf.PRESENT})
async def index_pods(body: kopf.Body, **_: Any) -> dict:
    return pod_entries(body)


@kopf.index("batch", "v1", "jobs", labels=MANAGED_BY)
async def index_jobs(body: kopf.Body, **_: Any) -> dict | None:
    return job_entries(body)


# ---- triggers ---------------------------------------------------------------------------------------------
def _owner_event(kind: str):
    async def on_event(type: str, namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
        eng: Engine = memo.engine
        key = (kind, namespace, name)
        # kopf's initial listing (a start-up), and its status already speaks of its spec: it waits behind the
        # resources that need work (created, or changed, while no operator ran).
        listed = type is None and settled(kwargs["body"])
        if type == "DELETED":
            eng.forget(key, (kwargs.get("body") or {}).get("metadata", {}).get("uid"))
        elif not eng.is_echo(kwargs["body"]):
            eng.schedule(key, listed)
        eng.schedule_dependents(key, listed)
    return on_event


def settled(body: Any) -> bool:
    """A status for the resource's current generation: an operator reconciled this spec before."""
    status = body.get("status") or {}
    return status.get("observedGeneration") == (body.get("metadata") or {}).get("generation", 1)


for _kind in KINDS.values():
    kopf.on.event(GROUP, VERSION, _kind.plural)(_owner_event(_kind.kind))


def _uid_of_owner(body: kopf.Body) -> str | None:
    ref = controller(body)
    return ref["uid"] if ref else (owner_uid_label(body) or None)


async def _child_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    eng: Engine = memo.engine
    if eng.is_echo(body):
        return
    uid = _uid_of_owner(body)
    key = eng.caches.owner_keys.get(uid) if uid else None
    if key is not None:
        if body.get("kind") == "Pod" and (lost := lost_pod(body)):
            eng.caches.lost_pods[uid] = lost
        eng.schedule(tuple(key), kwargs.get("type") is None)


kopf.on.event("ray.io", "v1", "rayjobs", labels=MANAGED_BY)(_child_event)
kopf.on.event("ray.io", "v1", "rayservices", labels=MANAGED_BY)(_child_event)
kopf.on.event("", "v1", "configmaps", labels={**MANAGED_BY, ROLE_LABEL: RESULT_ROLE})(_child_event)
kopf.on.event("", "v1", "configmaps", labels={**MANAGED_BY, ROLE_LABEL: CACHE_ROLE}, id="cache_reports")(_child_event)
kopf.on.event("batch", "v1", "jobs", labels=MANAGED_BY)(_child_event)
kopf.on.event("", "v1", "pods", labels={OWNER_UID_LABEL: kopf.PRESENT})(_child_event)


# ---- entry point ------------------------------------------------------------------------------------------
def run(*, namespaces: list[str], all_namespaces: bool, probe_port: int, metrics_port: int,
        standalone: bool, peering: str | None, log_format: str, priority: int = 0) -> int:
    memo = kopf.Memo(options={"metrics_port": metrics_port, "peering": peering, "clusterwide": all_namespaces})
    kopf_toggles.install()   # start-up readiness in O(n) rather than O(n^3) objects
    kopf.configure(verbose=False, log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(os.environ.get("LLMOPS_LOG_LEVEL", "INFO").upper())
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{probe_port}/healthz" if probe_port else None
    asyncio.run(kopf.operator(
        clusterwide=all_namespaces, namespaces=namespaces, liveness_endpoint=liveness,
        standalone=standalone, peering_name=peering, priority=priority, memo=memo,
    ))
    return 0
