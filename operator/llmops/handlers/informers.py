"""List-and-watch: the caches' indexes filled straight from the API server, and the reconcile triggers fed from it.

kopf's own watching runs every event of every watched object through its per-object pipeline (a worker task, its
memory, handler selection) and, with indexes, runs no handler before every listed object has been through it. A
restart with 5,000 resources at rest (15,000 watched objects) then created a new FineTune's RayJob 13 s after the
FineTune (docs/benchmarks.md, restart). Here a listed object costs its JSON and its index entries.

Each watched resource is listed once, then watched from the list's resourceVersion, like client-go's reflector:
a stream the server ends is resumed from the last version seen (bookmarks keep it current), and one the server
no longer can resume (410 Gone) is listed again, the objects that went meanwhile handled as deleted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import aiohttp

from ..kube import PLURALS, ApiError, Kube, collector_paused, path_of

log = logging.getLogger("llmops")

Entries = Callable[[Mapping[str, Any]], "dict | None"]
Trigger = Callable[["str | None", dict], None]   # (ADDED, MODIFIED, DELETED or None for a listed object; it)

SERVER_TIMEOUT_SECONDS = 900    # a watch stream is renewed this often: the only requests of an idle operator
ERROR_BACKOFFS = (1, 2, 5, 10, 30)


def backoff(failures: int) -> int:
    """Seconds to wait after this many failures in a row."""
    return ERROR_BACKOFFS[min(failures, len(ERROR_BACKOFFS) - 1)]


class Expired(Exception):
    """The server can no longer resume the watch from the version we have (410 Gone): list again."""


class Index:
    """key -> the values the watched objects gave it, kopf's index shape: each key reads as the collection of the
    values of every object that produced it (usually one)."""

    def __init__(self) -> None:
        self._by_key: dict[Any, dict[str, Any]] = {}
        self._keys_of: dict[str, tuple] = {}     # object uid -> the keys it gave

    def put(self, uid: str, entries: Mapping[Any, Any] | None) -> None:
        self.drop(uid)
        if not entries:
            return
        for key, value in entries.items():
            self._by_key.setdefault(key, {})[uid] = value
        self._keys_of[uid] = tuple(entries)

    def drop(self, uid: str) -> None:
        for key in self._keys_of.pop(uid, ()):
            values = self._by_key.get(key)
            if values is not None:
                values.pop(uid, None)
                if not values:
                    del self._by_key[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._by_key

    def __getitem__(self, key: Any) -> tuple:
        return tuple(self._by_key[key].values())

    def get(self, key: Any, default: Any = None) -> Any:
        values = self._by_key.get(key)
        return tuple(values.values()) if values else default

    def items(self) -> Iterator[tuple[Any, tuple]]:
        for key, values in list(self._by_key.items()):
            yield key, tuple(values.values())

    def __len__(self) -> int:
        return len(self._by_key)


@dataclass
class Watched:
    """One watched resource: where it is, which of its objects, what each gives the index, whom it triggers."""

    api_version: str
    kind: str
    entries: Entries
    selector: str = ""          # a label selector
    trigger: Trigger | None = None
    index: Index = field(default_factory=Index)
    fields: str = ""            # a field selector

    @property
    def plural(self) -> str:
        return PLURALS[(self.api_version, self.kind)]

    def typed(self, body: dict) -> dict:
        """The object with its apiVersion and kind, which the items of a built-in kind's list carry neither of."""
        body.setdefault("apiVersion", self.api_version)
        body.setdefault("kind", self.kind)
        return body


def _stub(body: Mapping[str, Any]) -> dict:
    """What a deletion handler reads of an object, kept for the objects a relist finds gone."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in ("name", "namespace", "uid", "labels", "ownerReferences") if k in meta}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept}


class Informer:
    """One watched resource in one namespace (None: all of them)."""

    def __init__(self, kube: Kube, watched: Watched, namespace: str | None):
        self.kube = kube
        self.watched = watched
        self.namespace = namespace
        self.path = path_of(watched.api_version, watched.kind, namespace)
        self.version = ""
        self._known: dict[str, dict] = {}    # uid -> its stub

    def __repr__(self) -> str:
        return f"{self.watched.plural} in {self.namespace or 'all namespaces'}"

    def _params(self) -> dict[str, str]:
        params = {"labelSelector": self.watched.selector} if self.watched.selector else {}
        if self.watched.fields:
            params["fieldSelector"] = self.watched.fields
        return params

    async def list(self) -> list[dict]:
        """List into the index (no triggers): the objects listed, for the caller to trigger once all are in."""
        try:
            listing = await self.kube.read("GET", self.path, self._params(), keep=True)
        except ApiError as e:
            if e.status != 404:
                raise
            # Not served (its CRD is not installed, or was deleted): none exist. The watch is tried again until
            # it is served, and then starts with every object there is.
            log.error("cannot list %s: the API server does not serve it (is its CRD installed? docs/clusters.md "
                      "lists what a cluster needs); watching for it", self)
            listing = {"metadata": {"resourceVersion": ""}, "items": []}
        self.version = listing["metadata"]["resourceVersion"]
        items = listing.get("items") or []
        gone = set(self._known)
        with collector_paused(freeze=True):
            for body in items:
                gone.discard(body["metadata"]["uid"])
                self._put(self.watched.typed(body))
        for uid in gone:   # went while no watch ran: deleted
            self.watched.index.drop(uid)
            stub = self._known.pop(uid)
            if self.watched.trigger is not None:
                self.watched.trigger("DELETED", stub)
        return items

    def _put(self, body: dict) -> None:
        uid = body["metadata"]["uid"]
        self.watched.index.put(uid, self.watched.entries(body))
        self._known[uid] = _stub(body)

    def handle(self, kind: str, body: dict) -> None:
        """One watch event: the index first, then the trigger (a reconcile reads the index)."""
        self.watched.typed(body)
        uid = body["metadata"]["uid"]
        if kind == "DELETED":
            self.watched.index.drop(uid)
            self._known.pop(uid, None)
        else:
            self._put(body)
        if self.watched.trigger is not None:
            self.watched.trigger(kind, body)

    async def watch(self) -> None:
        """Follow the stream from the last version seen until the server ends it."""
        params = {**self._params(), "watch": "true", "allowWatchBookmarks": "true",
                  "resourceVersion": self.version, "timeoutSeconds": str(SERVER_TIMEOUT_SECONDS)}
        try:
            async for event in self.kube.stream(self.path, params, SERVER_TIMEOUT_SECONDS + 60):
                kind, body = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiError(body.get("code") or 500, body.get("message", ""), body.get("reason", ""))
                self.version = (body.get("metadata") or {}).get("resourceVersion") or self.version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.handle(kind, body)
        except ApiError as e:
            if e.status == 410:   # as an event in the stream, or as the answer to the request
                raise Expired(e.message) from e
            raise

    async def follow(self) -> None:
        """Watch for as long as the operator runs: resume, relist on 410, back off on errors."""
        failures = 0
        while True:
            try:
                await self.watch()
                failures = 0
            except Expired:
                log.info("watch of %s expired: listing again", self)
                await self._relist()
            except asyncio.CancelledError:
                raise
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                delay = backoff(failures)
                failures += 1
                log.warning("watch of %s failed (%s): again in %s s", self, e, delay)
                await asyncio.sleep(delay)

    async def _relist(self) -> None:
        for body in await self.list_until_done():
            if self.watched.trigger is not None:
                self.watched.trigger(None, body)

    async def list_until_done(self) -> list[dict]:
        failures = 0
        while True:
            try:
                return await self.list()
            except asyncio.CancelledError:
                raise
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                delay = backoff(failures)
                failures += 1
                refused = isinstance(e, ApiError) and not e.transient
                hint = " (the operator's RBAC must allow list and watch)" if refused and e.status == 403 else ""
                (log.error if refused else log.warning)("cannot list %s: %s%s; again in %s s", self, e, hint, delay)
                await asyncio.sleep(delay)


class Informers:
    """Every watched resource in every watched namespace: list all, then trigger, then watch."""

    def __init__(self, kube: Kube, watched: list[Watched], namespaces: list[str] | None):
        self.informers = [Informer(kube, w, ns) for w in watched for ns in (namespaces or [None])]
        self.synced = asyncio.Event()

    async def run(self) -> None:
        # No trigger before every index has its listing: a reconcile right after a start must see the children
        # that exist, or it would create them again.
        listed = await asyncio.gather(*(i.list_until_done() for i in self.informers))
        for informer, items in zip(self.informers, listed):
            trigger = informer.watched.trigger
            if trigger is not None:
                for body in items:
                    trigger(None, body)
        self.synced.set()
        log.info("listed %d objects of %d watched resources", sum(map(len, listed)), len(self.informers))
        del listed
        await asyncio.gather(*(i.follow() for i in self.informers))
