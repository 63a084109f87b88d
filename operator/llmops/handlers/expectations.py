"""What this process wrote and the watches have not shown yet, in one place.

The reconciles read only the caches, and the caches lag behind our own writes. Deciding on a cache that does not
show a write yet would write it again, so until the watch brings each write back, this remembers it:

* the children set applied last for an owner (its hash, and the Ray object as the API server returned it);
* the children set a memo key was built into (so an unchanged owner is not rebuilt at all);
* the status written last (and the resourceVersion it was written over);
* the resourceVersion of each write, so its watch event is known as an echo and schedules nothing;
* a request the API server refused for good, until what would be sent changes.

Each memory ends when the watch catches up, and none outlives its owner (`forget`).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

APPLIED_MEMORY_SECONDS = 30.0   # long enough for the watch to bring back what was just applied
ECHO_MEMORY_LIMIT = 100_000     # resourceVersions of our writes not yet seen again (bounded, in case one never is)

Key = tuple[str, str, str]  # (kind, namespace, name)


class Applied(NamedTuple):
    """The children set this process applied for an owner last."""

    children_hash: str
    at: float                          # time.monotonic() of the write
    ray_object: dict[str, Any] | None  # the Ray object as the API server returned it; None once the watch has it


class Expectations:
    def __init__(self) -> None:
        self._applied: dict[str, Applied] = {}            # owner uid -> the set applied last
        self._built: dict[str, tuple[Any, str]] = {}      # owner uid -> (memo key, hash of the set it built)
        self._status: dict[str, tuple[str, dict]] = {}    # owner uid -> (resourceVersion before, status written)
        self._echoes: dict[Key, str] = {}                 # (kind, ns, name) -> resourceVersion of our write
        self._refused: dict[Key, str] = {}                # owner key -> fingerprint of the refused attempt

    def forget(self, key: Key, uid: str | None) -> None:
        """Drop all of it for a deleted owner."""
        self._refused.pop(key, None)
        if uid:
            for memory in (self._applied, self._built, self._status):
                memory.pop(uid, None)

    # ---- children ------------------------------------------------------------------------------------------
    def applied(self, uid: str, children_hash: str, ray_object: dict[str, Any] | None) -> None:
        self._applied[uid] = Applied(children_hash, time.monotonic(), ray_object)

    def recently_applied(self, uid: str) -> Applied | None:
        """What was applied for `uid` within APPLIED_MEMORY_SECONDS (the watch may not show it yet)."""
        applied = self._applied.get(uid)
        return applied if applied and time.monotonic() - applied.at < APPLIED_MEMORY_SECONDS else None

    def ray_object(self, uid: str, watched: dict[str, Any] | None) -> dict[str, Any] | None:
        """The owner's Ray object: the watch's, else the one this process created moments ago."""
        applied = self.recently_applied(uid)
        if watched is not None:
            if applied and applied.ray_object is not None:   # the watch has caught up: keep the object once
                self._applied[uid] = applied._replace(ray_object=None)
            return watched
        return applied.ray_object if applied else None

    def applied_hash(self, uid: str, marked: str | None) -> str | None:
        """The hash of the last complete set: this process's recent write first, else `marked` (the hash the
        watch shows on the marker child)."""
        applied = self.recently_applied(uid)
        if applied is None:
            return marked or None
        if marked == applied.children_hash and applied.ray_object is None:
            del self._applied[uid]   # the watch has caught up with all of it: keep nothing twice
        return applied.children_hash

    def built(self, uid: str, memo_key: Any, children_hash: str) -> None:
        self._built[uid] = (memo_key, children_hash)

    def last_built(self, uid: str) -> tuple[Any, str] | None:
        """The memo key the last set was built for, and that set's hash."""
        return self._built.get(uid)

    # ---- status --------------------------------------------------------------------------------------------
    def wrote_status(self, uid: str, resource_version_before: str, status: dict[str, Any]) -> None:
        self._status[uid] = (resource_version_before, status)

    def with_written_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body with the status written last, while the watch still shows the version it was written over."""
        uid = body["metadata"]["uid"]
        written = self._status.get(uid)
        if written is None:
            return body
        if written[0] != body["metadata"].get("resourceVersion", ""):
            del self._status[uid]   # the watch has caught up (or someone else wrote): the cache is the truth
            return body
        return {**body, "status": written[1]}

    # ---- echoes --------------------------------------------------------------------------------------------
    def wrote(self, obj: dict[str, Any] | None) -> None:
        meta = (obj or {}).get("metadata") or {}
        if meta.get("resourceVersion") and len(self._echoes) < ECHO_MEMORY_LIMIT:
            self._echoes[(obj["kind"], meta.get("namespace", ""), meta["name"])] = meta["resourceVersion"]

    def is_echo(self, body: Any) -> bool:
        """True for a watch event that only brings back what this process wrote (consumed once)."""
        meta = body.get("metadata") or {}
        written = self._echoes.pop((body.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")), None)
        return written is not None and written == meta.get("resourceVersion")

    # ---- refusals ------------------------------------------------------------------------------------------
    def refused(self, key: Key, attempt: str) -> None:
        self._refused[key] = attempt

    def was_refused(self, key: Key, attempt: str) -> bool:
        return self._refused.get(key) == attempt

    def accepted(self, key: Key) -> None:
        self._refused.pop(key, None)
