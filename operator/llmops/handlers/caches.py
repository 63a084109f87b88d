"""What the reconciles read instead of the API server: kopf's indexes, fed by the watches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    markers: IndexView = field(default_factory=IndexView)       # owner uid -> children hash on its result report
    owner_keys: IndexView = field(default_factory=IndexView)    # owner uid -> (kind, ns, name)
    refs: IndexView = field(default_factory=IndexView)          # referenced key -> keys of dependents
