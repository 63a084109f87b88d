"""The reconcile engine: coalescing per-resource work queue, caches fed by watches, one write path.

Every trigger (our resource changed, a child's status changed, a dependency became Ready) schedules one
reconcile of the owning resource. Triggers that arrive while it runs fold into one more run afterwards, so a
burst of events costs at most two reconciles. Reconciles read only the caches and write only what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from ..builders.common import BuildContext, is_shared, short_hash
from ..kube import ApiError, Kube, with_retries
from ..status import Verdict, conditions_for, same_status
from .caches import Caches, plain
from .metrics import Metrics
from .ordering import HASH_ANNOTATION, Plan, apply_rounds, holds, stateful
from .slots import Slots

log = logging.getLogger("llmops")

Key = tuple[str, str, str]  # (kind, namespace, name)
APPLIED_MEMORY_SECONDS = 30.0   # long enough for the watch to bring back what was just applied
ECHO_MEMORY_LIMIT = 100_000     # resourceVersions of our writes not yet seen again (bounded, in case one never is)
RECONCILE_SLOTS = 32            # reconciles deciding and applying at once (the API client has 32 connections)
STATUS_DEFER_SECONDS = 2.0      # what is not the Ray object waits at most this long for Ray objects being created
CREATION_QUIET_SECONDS = 0.1    # ... and for none to have started for this long (a burst's events come closer)
CACHE_LAG_RECHECK_SECONDS = 2.0  # a child the watch lost but the API server still has: look again this soon


def without_none(value: Any) -> Any:
    """A copy without null values: the API server rejects null where the schema says string."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value if v is not None]
    return value


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Outcome:
    """What a kind's reconcile decided: children to have, and where the resource stands."""

    children: list[dict[str, Any]]   # empty: nothing to have, or (with memo_key) already applied as they are
    verdict: Verdict
    ray_kind: str = "RayJob"
    memo_key: Any = None   # what the children are a function of, besides the process (None: not memoized)
    delete: list[tuple[str, str, str]] = field(default_factory=list)  # (apiVersion, kind, name) to remove
    requeue_after: float | None = None   # look again after this many seconds even if nothing changes
    confirm_absent: tuple[str, str, str] | None = None   # (apiVersion, kind, name): the verdict holds only if
    # the API server has no such child of this owner either (the watch may lag behind it)


class Applied(NamedTuple):
    """What this process applied for a resource last, remembered until the watches show it."""

    children_hash: str
    at: float                          # time.monotonic() of the write
    ray_object: dict[str, Any] | None  # the Ray object as the API server returned it; None once the watch has it


class PreviousRunPresent(Exception):
    """A child's name is taken by an object of an earlier resource of the same name (not yet collected, or
    orphaned). Taking it over would show that run's state as ours, so the reconcile waits instead."""


class Engine:
    def __init__(self, kube: Kube, ctx: BuildContext, caches: Caches | None = None):
        self.kube = kube
        self.ctx = ctx
        self.caches = caches or Caches()
        self.metrics = Metrics()
        self.kinds: dict[str, Callable[[Engine, dict[str, Any]], Outcome]] = {}
        self._running: dict[Key, asyncio.Task] = {}
        self._again: set[Key] = set()
        self._backoff: dict[Key, float] = {}
        self._refused: dict[Key, str] = {}   # what the API server refused for good, until the inputs change
        self._applied: dict[str, Applied] = {}  # uid -> what this process applied last
        self._hashes: dict[str, tuple[Any, str]] = {}    # uid -> (memo key, children hash): skip rebuilding
        self._written: dict[str, tuple[str, dict]] = {}  # uid -> (resourceVersion before, status) we wrote
        self._shared: dict[tuple[str, str], asyncio.Future | float] = {}   # shared child -> creating / created at
        self._echoes: dict[tuple[str, str, str], str] = {}   # (kind, ns, name) -> resourceVersion we wrote
        self._slots = Slots(RECONCILE_SLOTS)
        self._later: set[Key] = set()       # scheduled only because a (re)start listed them: served after the rest
        self._creating = 0                  # applies creating a Ray object right now
        self._quiet = asyncio.Event()       # set once none is, and none has started for CREATION_QUIET_SECONDS
        self._quiet.set()
        self._quiet_timer: asyncio.TimerHandle | None = None

    # ---- scheduling --------------------------------------------------------------------------------------
    def schedule(self, key: Key, listed: bool = False) -> None:
        """Reconcile `key` soon; `listed`: only because the watches listed it at start-up (it waits behind the
        resources that changed)."""
        if listed:
            if key not in self._running and key not in self._again:
                self._later.add(key)
        else:
            self._later.discard(key)
        if key in self._running:
            self._again.add(key)
            return
        self._running[key] = asyncio.get_running_loop().create_task(self._run(key))

    def forget(self, key: Key, uid: str | None) -> None:
        """Drop what this process remembers about a deleted resource."""
        self._backoff.pop(key, None)
        self._refused.pop(key, None)
        if uid:
            for memory in (self._applied, self._hashes, self._written):
                memory.pop(uid, None)

    # ---- what the caches do not show yet ---------------------------------------------------------------------
    def ray_object(self, uid: str) -> dict[str, Any] | None:
        """The owner's Ray object: from the watch, or the one this process created moments ago."""
        current = self.caches.ray_objects.get(uid)
        applied = self._recently_applied(uid)
        if current is not None:
            if applied and applied.ray_object is not None:   # the watch has caught up: keep the object once
                self._applied[uid] = applied._replace(ray_object=None)
            return current
        return applied.ray_object if applied else None

    def _recently_applied(self, uid: str) -> Applied | None:
        """What this process applied for `uid` within APPLIED_MEMORY_SECONDS (the watch may not show it yet)."""
        applied = self._applied.get(uid)
        return applied if applied and time.monotonic() - applied.at < APPLIED_MEMORY_SECONDS else None

    # ---- our own writes, coming back through the watches ------------------------------------------------------
    def _remember_echo(self, obj: dict[str, Any] | None) -> None:
        meta = (obj or {}).get("metadata") or {}
        if meta.get("resourceVersion") and len(self._echoes) < ECHO_MEMORY_LIMIT:
            self._echoes[(obj["kind"], meta.get("namespace", ""), meta["name"])] = meta["resourceVersion"]

    def is_echo(self, body: Any) -> bool:
        """True for a watch event that only brings back what this process wrote (it decided on that already)."""
        meta = body.get("metadata") or {}
        key = (body.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
        written = self._echoes.pop(key, None)
        return written is not None and written == meta.get("resourceVersion")

    def _with_written_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body with the status this process wrote last, while the watch has not brought that write back
        (same resourceVersion as before it): deciding on the older status would write the same change again."""
        uid = body["metadata"]["uid"]
        written = self._written.get(uid)
        if written is None:
            return body
        if written[0] != body["metadata"].get("resourceVersion", ""):
            del self._written[uid]   # the watch has caught up (or someone else wrote): the cache is the truth
            return body
        return {**body, "status": written[1]}

    def children_current(self, uid: str, memo_key: Any) -> bool:
        """True when the children for `memo_key` were built and applied already: no need to build them again."""
        memo = self._hashes.get(uid)
        return memo is not None and memo[0] == memo_key and self._applied_hash(uid) == memo[1]

    def _applied_hash(self, uid: str) -> str | None:
        """The children hash on the last child applied (a job's result report, else the Ray object): there, it says
        the whole set was written. This process's memory of a recent write first (the watch may still show the
        set before it), else the watch."""
        marked = self.caches.markers.get(uid)   # a job's result report ("" without the annotation)
        if marked is None:
            current = self.caches.ray_objects.get(uid)
            if current is not None:
                marked = (current.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION, "")
        applied = self._recently_applied(uid)
        if applied is None:
            return marked or None
        if marked == applied.children_hash and applied.ray_object is None:
            del self._applied[uid]   # the watch has caught up with all of it: keep nothing twice
        return applied.children_hash

    def schedule_dependents(self, key: Key, listed: bool = False) -> None:
        """Wake the resources that wait on `key` (a BatchInference on its FineTune, a service on its gates)."""
        for dependent in self.caches.refs.all(key):
            self.schedule(tuple(dependent), listed)

    async def _run(self, key: Key) -> None:
        try:
            while True:
                self._again.discard(key)
                retry = await self.reconcile(key)
                if retry is not None:
                    asyncio.get_running_loop().call_later(retry, self.schedule, key)
                if key not in self._again:
                    break
        finally:
            self._later.discard(key)
            self._running.pop(key, None)

    async def idle(self) -> None:
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    # ---- one reconcile -------------------------------------------------------------------------------------
    async def reconcile(self, key: Key) -> float | None:
        """Returns seconds until a retry is due, or None."""
        kind = key[0]
        body = self.caches.owners.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        body = self._with_written_status(body)
        started = time.monotonic()
        outcome: Outcome | None = None
        try:
            # Building and applying the Ray object: bounded, so a burst costs bounded memory.
            plan: Plan | None = None
            async with self._slots.slot(later=key in self._later):
                outcome = self.kinds[kind](self, body)
                if key in self._refused and self._refused[key] == _attempt(outcome, body):
                    return None  # already reported as Stalled; retrying the same request cannot succeed
                if outcome.children:
                    plan = self._plan(body, outcome)
                    if plan is not None:
                        await self._apply_first(plan)
            if plan is not None:
                await self._apply_rest(plan)
                if plan.created:
                    # Created just now: decide again with the new object, so the first status write says so.
                    outcome = self.kinds[kind](self, body)
            for api_version, child_kind, name in outcome.delete:
                if self.caches.ray_objects.get(body["metadata"]["uid"]) is not None:
                    await with_retries(lambda: self.kube.delete(api_version, child_kind, key[1], name))
            if outcome.confirm_absent and await self._child_exists(body, *outcome.confirm_absent):
                return CACHE_LAG_RECHECK_SECONDS
            await self._write_status(body, outcome)
        except ApiError as e:
            if _namespace_ending(e):
                return None  # the namespace is going away, and this resource with it
            self.metrics.api_errors[e.reason or str(e.status)] = self.metrics.api_errors.get(
                e.reason or str(e.status), 0) + 1
            if e.transient:
                return self._retry(key, kind, started, f"transient API error: {e}")
            log.warning("permanent API error on %s/%s %s: %s", key[1], key[2], kind, e)
            self._refused[key] = _attempt(outcome, body) if outcome else ""
            verdict = Verdict("Failed", "stalled", "ApplyFailed",
                              f"the API server refused a child object: {e.message}")
            try:
                await self._write_status(body, Outcome([], verdict))
            except ApiError:
                return self._retry(key, kind, started, "status write failed")
            self.metrics.count(kind, "stalled", time.monotonic() - started)
            return None
        except PreviousRunPresent as e:
            await self._write_status(body, Outcome([], Verdict("Pending", "progressing", "WaitingForPreviousRun",
                                                                str(e))))
            self.metrics.count(kind, "waiting", time.monotonic() - started)
            return 5.0
        except Exception as e:  # a bug or an unreachable API server: never hot-loop on it
            log.exception("reconcile of %s %s/%s failed", kind, key[1], key[2])
            return self._retry(key, kind, started, repr(e))
        self._backoff.pop(key, None)
        self._refused.pop(key, None)
        self.metrics.count(kind, "ok", time.monotonic() - started)
        return outcome.requeue_after

    def _retry(self, key: Key, kind: str, started: float, why: str) -> float:
        delay = min(self._backoff.get(key, 0.5) * 2, 300.0)
        self._backoff[key] = delay
        self.metrics.count(kind, "retry", time.monotonic() - started)
        log.info("will retry %s %s/%s in %.1fs: %s", kind, key[1], key[2], delay, why)
        return delay

    def _plan(self, body: dict[str, Any], outcome: Outcome) -> Plan | None:
        """How to apply the children, or None when this set was applied already (its hash is on the marker)."""
        wanted = short_hash(outcome.children, 16)
        uid = body["metadata"]["uid"]
        if outcome.memo_key is not None:
            self._hashes[uid] = (outcome.memo_key, wanted)
        if self._applied_hash(uid) == wanted and self.ray_object(uid) is not None:
            return None
        created = self.caches.ray_objects.get(uid) is None
        if created:  # first creation (or after a restart): make sure the names are ours to take
            self._check_names_free(body, outcome)
        rounds = apply_rounds(outcome.children, outcome.ray_kind)
        rounds[-1][-1]["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = wanted
        return Plan(uid, wanted, rounds, created and holds(outcome.children, outcome.ray_kind), outcome.ray_kind)

    async def _apply_first(self, plan: Plan) -> None:
        """The first round: with the Ray object in it, the work starts."""
        await self._apply_round(plan, plan.rounds[0])

    async def _apply_rest(self, plan: Plan) -> None:
        """The other rounds, the marker last. Once the Ray object exists they yield to Ray objects being created
        (in a burst, every job starts before any job's supporting objects are written)."""
        if len(plan.rounds) > 1 and holds(plan.rounds[0], plan.ray_kind):
            await self._after_creations()
        for children in plan.rounds[1:]:
            await self._apply_round(plan, children)
        self._applied[plan.uid] = Applied(plan.wanted, time.monotonic(), plan.fresh)

    async def _apply_round(self, plan: Plan, children: list[dict[str, Any]]) -> None:
        creating = plan.created and holds(children, plan.ray_kind)
        if creating:
            self._creating += 1
            self._quiet.clear()
        try:
            applied = await asyncio.gather(*(self._apply_one(c) for c in children))
        finally:
            if creating:
                self._creating -= 1
                if not self._creating:
                    if self._quiet_timer is not None:
                        self._quiet_timer.cancel()
                    self._quiet_timer = asyncio.get_running_loop().call_later(CREATION_QUIET_SECONDS,
                                                                              self._mark_quiet)
        for child, result in zip(children, applied):
            if creating and child["kind"] == plan.ray_kind and result:
                plan.fresh = plain(result, spec=False)   # as the index keeps it

    def _mark_quiet(self) -> None:
        self._quiet_timer = None
        if not self._creating:
            self._quiet.set()

    async def _after_creations(self) -> None:
        """Supporting children, status and events yield to Ray objects being created: in a burst, all the work
        starts first, and what it needs later and the reports follow."""
        if not self._quiet.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), STATUS_DEFER_SECONDS)

    async def _apply_one(self, child: dict[str, Any]) -> dict[str, Any] | None:
        if not is_shared(child):
            self.metrics.child_writes += 1
            applied = await with_retries(lambda: self.kube.apply(child))
            self._remember_echo(applied)
            return applied
        key = (child["metadata"]["namespace"], child["metadata"]["name"])
        created = self._shared.get(key)
        if self.caches.shared.get(key) is not None or (
                isinstance(created, float) and time.monotonic() - created < APPLIED_MEMORY_SECONDS):
            return None
        if not isinstance(created, asyncio.Future):   # one create for all the reconciles that need it now
            created = self._shared[key] = asyncio.ensure_future(self._create_shared(key, child))
        await asyncio.shield(created)
        return None

    async def _create_shared(self, key: tuple[str, str], child: dict[str, Any]) -> None:
        try:  # written once, never changed (immutable, named by its content)
            await with_retries(lambda: self.kube.apply(child))
            self.metrics.child_writes += 1
        except ApiError:
            self._shared.pop(key, None)
            raise
        self._shared[key] = time.monotonic()   # until the watch shows it

    async def _child_exists(self, body: dict[str, Any], api_version: str, kind: str, name: str) -> bool:
        """True when the API server still has this owner's child, not being deleted (the cache lags)."""
        live = await with_retries(lambda: self.kube.find(api_version, kind, body["metadata"]["namespace"], name))
        meta = (live or {}).get("metadata") or {}
        return not meta.get("deletionTimestamp") and any(
            ref.get("uid") == body["metadata"]["uid"] for ref in meta.get("ownerReferences") or [])

    def _check_names_free(self, body: dict[str, Any], outcome: Outcome) -> None:
        """The Ray object and the result report carry a run's state: if an earlier resource of the same name still
        owns one (not yet collected, or orphaned), taking it over would show that run's state as ours."""
        uid = body["metadata"]["uid"]
        for child in outcome.children:
            if not stateful(child, outcome.ray_kind):
                continue
            meta = child["metadata"]
            owner = self.caches.names.get((child["kind"], meta["namespace"], meta["name"]))
            if owner is not None and owner != uid:
                raise PreviousRunPresent(
                    f"{child['kind']} {meta['name']} still belongs to an earlier {body['kind']} named "
                    f"{body['metadata']['name']} (uid {owner or 'unknown'}); waiting for the garbage "
                    f"collector to remove it (if it was orphaned, delete it yourself)")

    async def _write_status(self, body: dict[str, Any], outcome: Outcome) -> None:
        meta = body["metadata"]
        current = body.get("status") or {}
        verdict = outcome.verdict
        status: dict[str, Any] = without_none({
            "phase": verdict.phase,
            "observedGeneration": meta.get("generation", 1),
            "message": verdict.message,
            **verdict.fields,
        })
        status["conditions"] = conditions_for(verdict, meta.get("generation", 1), current.get("conditions"),
                                              now_rfc3339())
        comparable = {k: v for k, v in current.items() if k in status}
        if same_status(comparable, status) and set(current) <= set(status):
            return
        await self._after_creations()
        written = await with_retries(lambda: self.kube.apply_status(body["apiVersion"], body["kind"],
                                                                    meta["namespace"], meta["name"], status))
        self._remember_echo(written)
        self._written[meta["uid"]] = (meta.get("resourceVersion", ""), status)
        self.metrics.status_writes += 1
        if current.get("phase") != verdict.phase:
            await self._event(body, verdict)

    async def _event(self, body: dict[str, Any], verdict: Verdict) -> None:
        meta = body["metadata"]
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": body["apiVersion"], "kind": body["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "reason": verdict.reason, "message": f"{verdict.phase}: {verdict.message}"[:1024],
            "type": "Warning" if verdict.state == "stalled" else "Normal",
            "source": {"component": "llmops-operator"},
            "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(), "count": 1,
        }
        try:
            await self.kube.create(event)
        except ApiError as e:  # an event is best effort: status already says it
            if not _namespace_ending(e):
                log.info("could not post event for %s: %s", meta["name"], e)


def _namespace_ending(e: ApiError) -> bool:
    return e.status == 403 and "being terminated" in e.message


def _attempt(outcome: Outcome, body: dict[str, Any]) -> str:
    """What a reconcile tried to write: a refused attempt is not repeated until something in it changes."""
    return short_hash([outcome.children, outcome.verdict.__dict__, meta_generation(body)], 16)


def meta_generation(body: dict[str, Any]) -> int:
    return body["metadata"].get("generation", 1)

