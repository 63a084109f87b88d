"""What the reconciles read instead of the API server: kopf's indexes, fed by the watches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..api import GROUP, KINDS, VERSION
from ..builders.common import CACHE_ROLE, DOWNLOAD_ROLE, OWNER_UID_LABEL, PAYLOADS_ROLE, RESULT_ROLE, ROLE_LABEL
from ..status import PREEMPTED, RAY_CLUSTER_LABEL, RAY_NODE_TYPE_LABEL, PodProblem, pod_problems
from .ordering import BUILT_ANNOTATION, HASH_ANNOTATION


def plain(body: Any, spec: bool = True) -> dict[str, Any]:
    """What the reconciles read of an object, kept small: no managedFields (often the largest part of an object),
    and, for Ray objects, no spec (only their status and annotations are read; their spec is what we wrote)."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    out = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": meta,
           "status": dict(body.get("status") or {})}
    if spec:
        out["spec"] = dict(body.get("spec") or {})
    return out


class IndexView:
    """Read access to one kopf index (key -> the values of the objects that produced it), or a plain dict."""

    def __init__(self, index: Any = None):
        self.index = index if index is not None else {}

    def get(self, key: Any, default: Any = None) -> Any:
        store = self.index.get(key)
        if not store:
            return default
        return next(iter(store)) if not isinstance(store, dict) else store

    def all(self, key: Any) -> list[Any]:
        store = self.index.get(key)
        return list(store) if store else []

    def items(self):
        for key, store in list(self.index.items()):
            for value in (store if not isinstance(store, dict) else [store]):
                yield key, value


@dataclass
class Caches:
    """Watch-fed views: kopf fills these indexes from its watches, and runs no handler before every index has
    its initial listing, so a reconcile right after a restart sees the children that already exist. Reading
    them costs no API request."""

    owners: IndexView = field(default_factory=IndexView)        # (kind, ns, name) -> our resource
    ray_objects: IndexView = field(default_factory=IndexView)   # owner uid -> RayJob/RayService
    results: IndexView = field(default_factory=IndexView)       # owner uid -> result ConfigMap data
    pods: IndexView = field(default_factory=IndexView)          # owner uid -> pods (name, status)
    names: IndexView = field(default_factory=IndexView)         # (kind, ns, name) -> owner uid of a stateful child
    shared: IndexView = field(default_factory=IndexView)        # (ns, name) -> a shared child that exists
    markers: IndexView = field(default_factory=IndexView)       # owner uid -> marked(its result report)
    owner_keys: IndexView = field(default_factory=IndexView)    # owner uid -> (kind, ns, name)
    refs: IndexView = field(default_factory=IndexView)          # referenced key -> keys of dependents
    cache_jobs: IndexView = field(default_factory=IndexView)    # owner uid -> its model download Job (status)
    cache_reports: IndexView = field(default_factory=IndexView)  # owner uid -> its model download's report data
    # owner uid -> (its RayCluster, the problem): a Ray pod seen lost with its node. The pod is deleted moments
    # later, often before a reconcile reads the pods index; this remembers it while that cluster (that attempt
    # of the job) lasts. Lost on a restart, when the status's own reason carries it on.
    lost_pods: dict = field(default_factory=dict)


# ---- what each watched object puts in the indexes (kopf calls these through handlers/main.py) -------------------
# Each index's keys are tagged by what they answer; `bind` reads them back through the tags.
def controller(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The controller owner reference to one of our resources, if any."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("apiVersion") == f"{GROUP}/{VERSION}" and ref.get("kind") in KINDS:
            return ref
    return None


def owner_uid_label(body: Mapping[str, Any]) -> str:
    return ((body.get("metadata") or {}).get("labels") or {}).get(OWNER_UID_LABEL, "")


def references(kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> dict:
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


def owner_entries(kind: str, body: Mapping[str, Any]) -> dict:
    """Our resource: ("owner", key) -> it; ("uid", uid) -> its key; ("ref", key it waits on) -> its key."""
    meta = body["metadata"]
    key = (kind, meta["namespace"], meta["name"])
    out: dict = {("owner", *key): plain(body), ("uid", meta["uid"]): key}
    for ref, me in references(*key, dict(body.get("spec") or {})).items():
        out[("ref", *ref)] = me
    return out


def ray_entries(kind: str, body: Mapping[str, Any]) -> dict:
    """A RayJob/RayService: ("object", owner uid) -> it; ("name", kind, ns, name) -> the owner uid its label names
    (whoever owns it: a new resource of an old name waits for the old run's object to go)."""
    meta = body["metadata"]
    out: dict = {("name", kind, meta["namespace"], meta["name"]): owner_uid_label(body)}
    ref = controller(body)
    if ref:
        out[("object", ref["uid"])] = plain(body, spec=False)
    return out


def configmap_entries(body: Mapping[str, Any]) -> dict | None:
    """Result reports: ("data", owner uid) -> data, ("applied", owner uid) -> what is marked on it (the whole set
    was applied), and ("name", ...) as for Ray objects; the shared payload sources: ("shared", ns,
    name)."""
    meta = body["metadata"]
    role = (meta.get("labels") or {}).get(ROLE_LABEL)
    if role == PAYLOADS_ROLE:
        return {("shared", meta["namespace"], meta["name"]): True}
    if role == CACHE_ROLE:
        ref = controller(body)
        return {("cache", ref["uid"]): dict(body.get("data") or {})} if ref else None
    if role != RESULT_ROLE:
        return None
    out: dict = {("name", "ConfigMap", meta["namespace"], meta["name"]): owner_uid_label(body)}
    ref = controller(body)
    if ref:
        out[("data", ref["uid"])] = dict(body.get("data") or {})
        out[("applied", ref["uid"])] = marked(body)
    return out


def marked(body: Mapping[str, Any]) -> tuple[str, str]:
    """What the marker child says: the hash of the set applied last, and what that set was built from ("" when
    the annotation is not there)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return annotations.get(HASH_ANNOTATION, ""), annotations.get(BUILT_ANNOTATION, "")


def job_entries(body: Mapping[str, Any]) -> dict | None:
    """A model download Job: owner uid -> it, without its spec (only its status is read)."""
    ref = controller(body)
    return {ref["uid"]: plain(body, spec=False)} if ref else None


def pod_entries(body: Mapping[str, Any]) -> dict:
    labels = body["metadata"].get("labels") or {}
    kept = {k: labels[k] for k in (RAY_CLUSTER_LABEL, RAY_NODE_TYPE_LABEL, ROLE_LABEL) if k in labels}
    meta = {"name": body["metadata"]["name"], "labels": kept}
    if body["metadata"].get("deletionTimestamp"):
        meta["deletionTimestamp"] = body["metadata"]["deletionTimestamp"]
    return {owner_uid_label(body): {"metadata": meta, "status": dict(body.get("status") or {})}}


def is_download(pod: Mapping[str, Any]) -> bool:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(ROLE_LABEL) == DOWNLOAD_ROLE


def ray_pods(pods: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """An owner's pods less its model download's."""
    return [p for p in pods if not is_download(p)]


def lost_pod(body: Mapping[str, Any]) -> tuple[str | None, PodProblem] | None:
    """(its RayCluster, the problem) for a Ray pod going away with its node, else None."""
    lost = [p for p in pod_problems([body]) if p.reason == PREEMPTED]
    if not lost:
        return None
    return ((body.get("metadata") or {}).get("labels") or {}).get(RAY_CLUSTER_LABEL), lost[0]


class Merged:
    """Several indexes read as one mapping, through one tag of their keys."""

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


def bind(caches: Caches, owners: Iterable[Any], rayjobs: Any, rayservices: Any, configmaps: Any, pods: Any,
         jobs: Any = None) -> None:
    """Point the caches at the indexes (one per kind of ours, then the children's), read through their tags."""
    ours = list(owners)
    caches.owners.index = Merged("owner", *ours)
    caches.owner_keys.index = Merged("uid", *ours)
    caches.refs.index = Merged("ref", *ours)
    caches.ray_objects.index = Merged("object", rayjobs, rayservices)
    caches.names.index = Merged("name", rayjobs, rayservices, configmaps)
    caches.results.index = Merged("data", configmaps)
    caches.markers.index = Merged("applied", configmaps)
    caches.shared.index = Merged("shared", configmaps)
    caches.pods.index = pods
    caches.cache_reports.index = Merged("cache", configmaps)
    caches.cache_jobs.index = jobs if jobs is not None else {}
