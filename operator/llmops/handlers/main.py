"""kopf wiring: login, settings (one startup hook), watches that feed the caches, and `llmops run`.

Handlers here only translate kopf's callbacks into cache updates and scheduled reconciles; the decisions
live in the per-kind modules and the engine.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any

import kopf

from ..api import GROUP, KINDS, VERSION
from ..builders.common import BuildContext
from ..kube import Credentials, Kube
from ..settings import Settings
from . import batchinference, finetune, llmservice
from .engine import Caches, Engine
from .metrics import serve_metrics

log = logging.getLogger("llmops")
MANAGED = {"app.kubernetes.io/managed-by": "llmops"}
RECONCILERS = {"FineTune": finetune.reconcile, "BatchInference": batchinference.reconcile,
               "LLMService": llmservice.reconcile}

STATE: dict[str, Any] = {}   # the running operator's engine and options, set at start-up


def load_payloads() -> dict[str, str]:
    """The payload modules shipped to Ray pods, read once from the installed `payloads` package."""
    package = resources.files("payloads")
    return {f.name: f.read_text() for f in sorted(package.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".py")}


def engine() -> Engine:
    return STATE["engine"]


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
    options = STATE.get("options", {})
    settings.posting.enabled = False          # we post our own Events, one per phase change
    settings.scanning.disabled = True         # no cluster-wide namespace/CRD scans: least rights
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    settings.batching.worker_limit = 200
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
    eng.kinds.update(RECONCILERS)
    eng.dependents.extend([batchinference.dependents_of(eng), llmservice.dependents_of(eng)])
    STATE["engine"] = eng
    if options.get("metrics_port"):
        await serve_metrics(eng, options["metrics_port"])


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if "engine" in STATE:
        await STATE["engine"].kube.close()


# ---- our resources -----------------------------------------------------------------------------------------
def _owner_event(kind: str):
    async def on_event(type: str, body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
        eng = engine()
        key = (kind, namespace, name)
        if type == "DELETED":
            eng.caches.owners.pop(key, None)
        else:
            eng.caches.owners[key] = _plain(body)
            eng.schedule(key)
        eng.schedule_dependents(key)
    return on_event


for _kind in KINDS.values():
    kopf.on.event(GROUP, VERSION, _kind.plural)(_owner_event(_kind.kind))


# ---- children ---------------------------------------------------------------------------------------------
def _owner_key(body: kopf.Body) -> tuple[str, str, str] | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("apiVersion") == f"{GROUP}/{VERSION}" and ref.get("kind") in KINDS:
            return ref["kind"], body["metadata"]["namespace"], ref["name"]
    return None


def _owner_uid(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def _child_event(store: str):
    async def on_event(type: str, body: kopf.Body, **_: Any) -> None:
        eng = engine()
        uid, key = _owner_uid(body), _owner_key(body)
        if uid is None or key is None:
            return
        cache = getattr(eng.caches, store)
        if store == "results":
            if type == "DELETED":
                cache.pop(uid, None)
            else:
                cache[uid] = dict(body.get("data") or {})
        elif type == "DELETED":
            cache.pop(uid, None)
        else:
            cache[uid] = _plain(body)
        eng.schedule(key)
    return on_event


kopf.on.event("ray.io", "v1", "rayjobs", labels=MANAGED)(_child_event("ray_objects"))
kopf.on.event("ray.io", "v1", "rayservices", labels=MANAGED)(_child_event("ray_objects"))
kopf.on.event("", "v1", "configmaps", labels={**MANAGED, "llmops.dev/role": "result"})(_child_event("results"))


@kopf.on.event("", "v1", "pods", labels={"llmops.dev/owner-uid": kopf.PRESENT})
async def pod_event(type: str, body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    eng = engine()
    uid = body["metadata"]["labels"]["llmops.dev/owner-uid"]
    pods = eng.caches.pods.setdefault(uid, {})
    if type == "DELETED":
        pods.pop(name, None)
    else:
        pods[name] = {"metadata": {"name": name}, "status": dict(body.get("status") or {})}
    owner = next((k for k, v in eng.caches.owners.items() if v["metadata"].get("uid") == uid), None)
    if owner:
        eng.schedule(owner)


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": dict(body.get("metadata") or {}), "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {})}


# ---- entry point ------------------------------------------------------------------------------------------
def run(*, namespaces: list[str], all_namespaces: bool, probe_port: int, metrics_port: int,
        standalone: bool, peering: str | None, log_format: str) -> int:
    STATE["options"] = {"metrics_port": metrics_port, "peering": peering, "clusterwide": all_namespaces}
    kopf.configure(verbose=False, log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{probe_port}/healthz" if probe_port else None
    asyncio.run(kopf.operator(
        clusterwide=all_namespaces, namespaces=namespaces, liveness_endpoint=liveness,
        standalone=standalone, peering_name=peering,
    ))
    return 0
