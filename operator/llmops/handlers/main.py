"""kopf wiring: login, settings (one startup hook), watches that feed the caches, and `llmops run`.

Handlers here only translate kopf's callbacks into cache updates and scheduled reconciles; the decisions
live in the per-kind modules and the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
from importlib import resources
from typing import Any

import kopf

from ..api import GROUP, KINDS, VERSION
from ..builders.common import OWNER_UID_LABEL, PAYLOADS_ROLE, RESULT_ROLE, ROLE_LABEL, BuildContext
from ..kube import Credentials, Kube
from ..settings import Settings
from . import batchinference, finetune, kopf_toggles, llmservice
from .caches import plain
from .engine import Engine
from .ordering import HASH_ANNOTATION
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
async def startup(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> None:
    options = STATE.get("options", {})
    settings.posting.enabled = False          # we post our own Events, one per phase change
    settings.scanning.disabled = True         # no cluster-wide namespace/CRD scans: least rights
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    # No worker limit: kopf holds each object's worker until every index has its initial listing, so a limit
    # below the number of watched objects would deadlock the start-up.
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 1.0      # an object's kopf worker goes 1 s after its last event (default 5)
    # Server-side filters: the API server sends only our children, not every ConfigMap and Pod in the cluster.
    managed = ",".join(f"{k}={v}" for k, v in MANAGED.items())
    settings.watching.label_selectors["rayjobs"] = managed
    settings.watching.label_selectors["rayservices"] = managed
    settings.watching.label_selectors["configmaps"] = f"{managed},{ROLE_LABEL} in ({RESULT_ROLE},{PAYLOADS_ROLE})"
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
    eng.kinds.update(RECONCILERS)
    STATE["engine"] = eng
    if options.get("metrics_port"):
        await serve_metrics(eng, options["metrics_port"])


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if "engine" in STATE:
        await STATE["engine"].kube.close()


# ---- indexes: kopf lists every watched kind before it runs any handler ------------------------------------
# One index per watched resource, its keys tagged by what they answer (kopf calls every handler of a resource
# for every event, so each extra handler is paid for each event). All are coroutines: kopf runs plain functions
# in a thread pool, and that hop cost more than the handlers themselves.
def _controller(body: kopf.Body) -> dict[str, Any] | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("apiVersion") == f"{GROUP}/{VERSION}" and ref.get("kind") in KINDS:
            return ref
    return None


def references(kind: str, namespace: str, name: str, spec: dict[str, Any]) -> dict:
    """(referenced kind, namespace, name) -> the key of the resource that waits on it."""
    me = (kind, namespace, name)
    refs = {}
    ft = ((spec.get("model") or {}).get("fineTuneRef") or {}).get("name")
    if ft:
        refs[("FineTune", namespace, ft)] = me
    for adapter in spec.get("adapters") or []:
        if (adapter.get("fineTuneRef") or {}).get("name"):
            refs[("FineTune", namespace, adapter["fineTuneRef"]["name"])] = me
        gate = ((adapter.get("gate") or {}).get("batchInferenceRef") or {}).get("name")
        if gate:
            refs[("BatchInference", namespace, gate)] = me
    return refs


def _our_index(kind: str):
    """("owner", key) -> the resource; ("uid", uid) -> its key; ("ref", key it waits on) -> its key."""
    async def index(body: kopf.Body, namespace: str, name: str, uid: str, **_: Any) -> dict:
        key = (kind, namespace, name)
        out: dict = {("owner", *key): plain(body), ("uid", uid): key}
        for ref, me in references(kind, namespace, name, dict(body.get("spec") or {})).items():
            out[("ref", *ref)] = me
        return out
    return index


def _owner_uid_label(body: kopf.Body) -> str:
    return body.get("metadata", {}).get("labels", {}).get(OWNER_UID_LABEL, "")


def _ray_index(kind: str):
    """("object", owner uid) -> the RayJob/RayService; ("name", kind, ns, name) -> the owner uid its label names
    (whoever owns it: a new resource of an old name waits for the old run's object to go, PreviousRunPresent)."""
    async def index(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict:
        out: dict = {("name", kind, namespace, name): _owner_uid_label(body)}
        ref = _controller(body)
        if ref:
            out[("object", ref["uid"])] = plain(body, spec=False)
        return out
    return index


for _kind in KINDS.values():
    kopf.index(GROUP, VERSION, _kind.plural, id=f"index_{_kind.plural}")(_our_index(_kind.kind))
kopf.index("ray.io", "v1", "rayjobs", labels=MANAGED, id="index_rayjobs")(_ray_index("RayJob"))
kopf.index("ray.io", "v1", "rayservices", labels=MANAGED, id="index_rayservices")(_ray_index("RayService"))


@kopf.index("", "v1", "configmaps", labels={**MANAGED, ROLE_LABEL: kopf.PRESENT})
async def index_configmaps(body: kopf.Body, namespace: str, name: str, **_: Any) -> dict | None:
    """Result reports: ("data", owner uid) -> data, ("applied", owner uid) -> the children hash written on it last
    (the whole set was applied), and ("name", ...) as for Ray objects; the shared payload sources: ("shared", ns,
    name)."""
    role = body["metadata"]["labels"][ROLE_LABEL]
    if role == PAYLOADS_ROLE:
        return {("shared", namespace, name): True}
    if role != RESULT_ROLE:
        return None
    out: dict = {("name", "ConfigMap", namespace, name): _owner_uid_label(body)}
    ref = _controller(body)
    if ref:
        out[("data", ref["uid"])] = dict(body.get("data") or {})
        out[("applied", ref["uid"])] = (body["metadata"].get("annotations") or {}).get(HASH_ANNOTATION, "")
    return out


@kopf.index("", "v1", "pods", labels={OWNER_UID_LABEL: kopf.PRESENT})
async def index_pods(body: kopf.Body, name: str, **_: Any) -> dict:
    return {body["metadata"]["labels"][OWNER_UID_LABEL]:
            {"metadata": {"name": name}, "status": dict(body.get("status") or {})}}


class _Merged:
    """Several kopf indexes read as one mapping, through one tag of their keys."""

    def __init__(self, tag: str | None, *indexes: Any):
        self.tag = tag
        self.indexes = indexes

    def _key(self, key: Any) -> Any:
        if self.tag is None:
            return key
        return (self.tag, *key) if isinstance(key, tuple) else (self.tag, key)

    def get(self, key: Any, default: Any = None) -> Any:
        key = self._key(key)
        for index in self.indexes:
            if key in index:
                return index[key]
        return default

    def items(self):
        for index in self.indexes:
            for key, store in index.items():
                if self.tag is None:
                    yield key, store
                elif isinstance(key, tuple) and key and key[0] == self.tag:
                    yield key[1:] if len(key) > 2 else key[1], store


def _bind(kwargs: dict[str, Any]) -> Engine:
    """Give the engine the kopf indexes (the same objects for the operator's lifetime)."""
    eng = engine()
    if not STATE.get("bound"):
        c = eng.caches
        ours = [kwargs[f"index_{k.plural}"] for k in KINDS.values()]
        ray = (kwargs["index_rayjobs"], kwargs["index_rayservices"])
        c.owners.index = _Merged("owner", *ours)
        c.owner_keys.index = _Merged("uid", *ours)
        c.refs.index = _Merged("ref", *ours)
        c.ray_objects.index = _Merged("object", *ray)
        c.names.index = _Merged("name", *ray, kwargs["index_configmaps"])
        c.results.index = _Merged("data", kwargs["index_configmaps"])
        c.markers.index = _Merged("applied", kwargs["index_configmaps"])
        c.shared.index = _Merged("shared", kwargs["index_configmaps"])
        c.pods.index = kwargs["index_pods"]
        STATE["bound"] = True
    return eng


# ---- triggers ---------------------------------------------------------------------------------------------
def _owner_event(kind: str):
    async def on_event(type: str, namespace: str, name: str, **kwargs: Any) -> None:
        eng = _bind(kwargs)
        key = (kind, namespace, name)
        listed = type is None   # kopf's initial listing (a start-up), not a change
        if type == "DELETED":
            eng.forget(key, (kwargs.get("body") or {}).get("metadata", {}).get("uid"))
        elif not eng.is_echo(kwargs["body"]):
            eng.schedule(key, listed)
        eng.schedule_dependents(key, listed)
    return on_event


for _kind in KINDS.values():
    kopf.on.event(GROUP, VERSION, _kind.plural)(_owner_event(_kind.kind))


def _uid_of_owner(body: kopf.Body) -> str | None:
    ref = _controller(body)
    return ref["uid"] if ref else (_owner_uid_label(body) or None)


async def _child_event(body: kopf.Body, **kwargs: Any) -> None:
    eng = _bind(kwargs)
    if eng.is_echo(body):
        return
    uid = _uid_of_owner(body)
    key = eng.caches.owner_keys.get(uid) if uid else None
    if key is not None:
        eng.schedule(tuple(key), kwargs.get("type") is None)


kopf.on.event("ray.io", "v1", "rayjobs", labels=MANAGED)(_child_event)
kopf.on.event("ray.io", "v1", "rayservices", labels=MANAGED)(_child_event)
kopf.on.event("", "v1", "configmaps", labels={**MANAGED, ROLE_LABEL: RESULT_ROLE})(_child_event)
kopf.on.event("", "v1", "pods", labels={OWNER_UID_LABEL: kopf.PRESENT})(_child_event)


# ---- entry point ------------------------------------------------------------------------------------------
def run(*, namespaces: list[str], all_namespaces: bool, probe_port: int, metrics_port: int,
        standalone: bool, peering: str | None, log_format: str, priority: int = 0) -> int:
    STATE["options"] = {"metrics_port": metrics_port, "peering": peering, "clusterwide": all_namespaces}
    kopf_toggles.install()   # start-up readiness in O(n) rather than O(n^3) objects
    kopf.configure(verbose=False, log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(os.environ.get("LLMOPS_LOG_LEVEL", "INFO").upper())
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{probe_port}/healthz" if probe_port else None
    asyncio.run(kopf.operator(
        clusterwide=all_namespaces, namespaces=namespaces, liveness_endpoint=liveness,
        standalone=standalone, peering_name=peering, priority=priority,
    ))
    return 0
