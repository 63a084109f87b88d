"""The reconcile engine: coalescing per-resource work queue, caches fed by watches, one write path.

Every trigger (our resource changed, a child's status changed, a dependency became Ready) schedules one
reconcile of the owning resource. Triggers that arrive while it runs fold into one more run afterwards, so a
burst of events costs at most two reconciles. Reconciles read only the caches and write only what changed: each
observes (handlers/observe.py), decides (llmops.decide, pure) and applies here, the kind's steps found in one
place (handlers/kinds.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Mapping

from ..builders.common import BuildContext, is_shared, short_hash
from ..decide.common import Outcome
from ..decide.jobs import TERMINAL
from ..kube import ApiError, Kube, with_retries
from ..status import Verdict, same_status
from .caches import Caches, marked, plain
from .discovery import Discovery
from .expectations import APPLIED_MEMORY_SECONDS, Expectations, Key
from .kinds import RECONCILERS, Reconciler
from .writes import attempt_of, blocked_by, event_for, outdated_crd, retrying_after, status_for
from .metrics import Metrics
from .reads import cluster_changed, workload_changed
from .ordering import BUILT_ANNOTATION, HASH_ANNOTATION, Plan, apply_rounds, holds, identity, stateful
from .slots import Gathered, Lull, Slots

log = logging.getLogger("llmops")

RECONCILE_SLOTS = 32            # reconciles deciding and applying at once (the API client has 32 connections)
STATUS_DEFER_SECONDS = 2.0      # the most that other writes wait for Ray objects (and children) being applied
QUIET_SECONDS = 0.1             # ... until none has been for this long (a burst's events come closer)
SAY_RETRYING_SECONDS = 4.0      # a back-off this long (the third failure in a row) is said in the status
CACHE_LAG_RECHECK_SECONDS = 2.0  # a child the watch lost but the API server still has: look again this soon
LISTING_QUIET_SECONDS = 0.2     # listed resources start once no more have been listed for this long
LISTING_LIMIT_SECONDS = 10.0    # ... or once they have waited this long


class PreviousRunPresent(Exception):
    """A child's name is taken by an object of an earlier resource of the same name (not yet collected, or
    orphaned). Taking it over would show that run's state as ours, so the reconcile waits instead."""


class Engine:
    def __init__(self, kube: Kube, ctx: BuildContext, caches: Caches | None = None,
                 kinds: Mapping[str, Reconciler] = RECONCILERS):
        self.kube = kube
        self.ctx = ctx
        self.caches = caches or Caches()
        self.metrics = Metrics()
        self.workloads: dict[str, dict[str, Any] | None] = {}   # a queued RayJob's uid -> its Kueue Workload
        self.clusters: dict[str, tuple[str, str]] = {}   # owner uid -> (its RayCluster, why pods fail), once read
        self.kinds = dict(kinds)
        self.discovery = Discovery(kube)
        self._running: dict[Key, asyncio.Task] = {}
        self._again: set[Key] = set()
        self._backoff: dict[Key, float] = {}
        self.expected = Expectations()
        self._shared: dict[tuple[str, str], asyncio.Future | float] = {}   # shared child -> creating / created at
        self._slots = Slots(RECONCILE_SLOTS)
        self._later: set[Key] = set()       # scheduled only because a (re)start listed them: served after the rest
        # ... and not started yet: they start once the listing's events stop
        self._listed = Gathered(LISTING_QUIET_SECONDS, LISTING_LIMIT_SECONDS, self._start_listed)
        self._creations = Lull(QUIET_SECONDS)   # rounds creating a Ray object: the rest of the children wait
        self._children = Lull(QUIET_SECONDS)    # rounds applying children: status writes and events wait

    # ---- scheduling --------------------------------------------------------------------------------------
    def schedule(self, key: Key, listed: bool = False) -> None:
        """Reconcile `key` soon; `listed`: only because the watches listed it at start-up (it waits behind the
        resources that changed)."""
        if listed and key not in self._running:
            # Not started yet: a start-up lists thousands at once, and reconciles started among them would delay
            # those of the resources that need work.
            self._listed.add(key)
            return
        if not listed:
            self._later.discard(key)
            self._listed.discard(key)
        self._start(key)

    def _start(self, key: Key) -> None:
        if key in self._running:
            self._again.add(key)
            return
        self._running[key] = asyncio.get_running_loop().create_task(self._run(key))

    def _start_listed(self, keys: list[Key]) -> None:
        for key in keys:
            if key not in self._running:
                self._later.add(key)
            self._start(key)

    def forget(self, key: Key, uid: str | None) -> None:
        """Drop what this process remembers about a deleted resource."""
        self._backoff.pop(key, None)
        self.expected.forget(key, uid)
        if uid:
            self.caches.lost_pods.pop(uid, None)
            self.clusters.pop(uid, None)

    # ---- what the caches do not show yet -------------------------------------------------------------------
    def ray_object(self, uid: str) -> dict[str, Any] | None:
        """The owner's Ray object: from the watch, or the one this process created moments ago."""
        return self.expected.ray_object(uid, self.caches.ray_objects.get(uid))

    def is_echo(self, body: Any) -> bool:
        """True for a watch event that only brings back what this process wrote (it decided on that already)."""
        return self.expected.is_echo(body)

    def applied_memo_key(self, uid: str) -> str | None:
        """What the applied children were built from (`built_from`): when a reconcile would build them from the
        same, they are applied as they are. This process's own build first; after a restart, the marker's."""
        applied, marked_from = self._applied(uid)
        built = self.expected.last_built(uid)
        if built is not None:
            return built[0] if applied == built[1] else None
        return marked_from or None

    def _applied(self, uid: str) -> tuple[str | None, str]:
        """The children hash of the last complete set (the marker's as the watch shows it, unless this process
        wrote a newer one), and what the marker says that set was built from ("" when it says nothing of it)."""
        marked, marked_from = self._marked(uid)
        applied = self.expected.applied_hash(uid, marked)
        return applied, marked_from if applied == marked else ""

    def _marked(self, uid: str) -> tuple[str, str]:
        """What the last child applied says (a job's result report, else the Ray object): (children hash, built
        from), "" for what it lacks."""
        marker = self.caches.markers.get(uid)
        if marker is None:
            current = self.caches.ray_objects.get(uid)
            marker = marked(current) if current is not None else ("", "")
        return marker

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
        while self._running or self._listed:
            if not self._running:
                await asyncio.sleep(LISTING_QUIET_SECONDS)
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    # ---- one reconcile -------------------------------------------------------------------------------------
    async def reconcile(self, key: Key) -> float | None:
        """Returns seconds until a retry is due, or None."""
        kind = key[0]
        body = self.caches.owners.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        body = self.expected.with_written_status(body)
        started = time.monotonic()
        attempt = ""   # what this reconcile set out to write, fingerprinted before the plan annotates it
        try:
            if self.kinds[kind].prepare is not None:
                await self.kinds[kind].prepare(self, body)
            # Building and applying the Ray object: bounded, so a burst costs bounded memory.
            plan: Plan | None = None
            async with self._slots.slot(later=key in self._later):
                outcome = self._decide(kind, body)
                attempt = attempt_of(outcome, body)
                if self.expected.was_refused(key, attempt):
                    return None  # already reported as Stalled; retrying the same request cannot succeed
                if outcome.children:
                    plan = self._plan(body, outcome)
                    if plan is not None:
                        await self._apply_first(plan)
            if plan is not None:
                await self._apply_rest(plan)
                if plan.created:
                    # Created just now: decide again with the new object, so the first status write says so.
                    outcome = self._decide(kind, body)
            for api_version, child_kind, name in outcome.delete:
                if child_kind != outcome.ray_kind or self.caches.ray_objects.get(body["metadata"]["uid"]) is not None:
                    await with_retries(lambda: self.kube.delete(api_version, child_kind, key[1], name))
            if outcome.queued and await workload_changed(self, body, outcome.queued):
                outcome = self._decide(kind, body)   # decide again, with Kueue's current reason
            if outcome.check_cluster and await cluster_changed(self, body, outcome.check_cluster):
                outcome = self._decide(kind, body)   # decide again, with why KubeRay cannot create its pods
            if outcome.confirm_absent and await self._child_exists(body, *outcome.confirm_absent):
                return CACHE_LAG_RECHECK_SECONDS
            await self._write_status(body, outcome)
        except ApiError as e:
            if e.namespace_ending:
                return None  # the namespace is going away, and this resource with it
            self.metrics.api_errors[e.reason or str(e.status)] = self.metrics.api_errors.get(
                e.reason or str(e.status), 0) + 1
            blocked = blocked_by(e)
            if blocked is not None:
                return await self._blocked(key, body, started, blocked)
            if e.transient:
                delay = self._retry(key, kind, started, f"transient API error: {e}")
                if delay >= SAY_RETRYING_SECONDS and (body.get("status") or {}).get("phase") in (None, "Pending"):
                    with contextlib.suppress(ApiError):   # not started yet: nothing else would say why
                        await self._write_status(body, Outcome([], retrying_after(e)))
                return delay
            if e.status == 404 and self.discovery.invalidate():
                # An optional API seen earlier may be gone (its CRDs deleted): decide again on a fresh reading.
                return self._retry(key, kind, started, f"not found, reading API discovery again: {e}")
            log.warning("permanent API error on %s/%s %s: %s", key[1], key[2], kind, e)
            self.expected.refused(key, attempt)
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
        self.expected.accepted(key)
        self.metrics.count(kind, "ok", time.monotonic() - started)
        return outcome.requeue_after

    def _decide(self, kind: str, body: dict[str, Any]) -> Outcome:
        """Observe, then decide: what to apply, and the status."""
        reconciler = self.kinds[kind]
        outcome = reconciler.decide(reconciler.observe(self, body), self.ctx)
        if outcome.verdict.phase in TERMINAL:   # the run is over: a pod it lost is no longer news
            self.caches.lost_pods.pop(body["metadata"]["uid"], None)
        return outcome

    async def _blocked(self, key: Key, body: dict[str, Any], started: float, verdict: Verdict) -> float:
        """A refusal that a change elsewhere ends: said in the status (or, when the resource's own CRD is too old
        to hold it, in an Event, the first time in a row), and tried again with back-off."""
        log.warning("%s %s/%s: %s", key[0], key[1], key[2], verdict.message)
        try:
            await self._write_status(body, Outcome([], verdict))
        except ApiError as e:
            if e.outdated_schema is None or key in self._backoff:
                return self._retry(key, key[0], started, f"status write failed: {e}")
            await self._post_event(body, outdated_crd(*e.outdated_schema))
        return self._retry(key, key[0], started, verdict.reason)

    def _retry(self, key: Key, kind: str, started: float, why: str) -> float:
        delay = min(self._backoff.get(key, 0.5) * 2, 300.0)
        self._backoff[key] = delay
        self.metrics.count(kind, "retry", time.monotonic() - started)
        log.info("will retry %s %s/%s in %.1fs: %s", kind, key[1], key[2], delay, why)
        return delay

    def _plan(self, body: dict[str, Any], outcome: Outcome) -> Plan | None:
        """How to apply the children, or None when this set was applied already (its hash is on the marker)."""
        wanted = short_hash(identity(outcome.children), 16)
        uid = body["metadata"]["uid"]
        if outcome.memo_key is not None:
            self.expected.built(uid, outcome.memo_key, wanted)
        rounds = apply_rounds(outcome.children, outcome.ray_kind)
        marker = rounds[-1][-1]
        annotations = marker["metadata"].setdefault("annotations", {})
        annotations[HASH_ANNOTATION] = wanted
        if outcome.memo_key is not None:
            annotations[BUILT_ANNOTATION] = outcome.memo_key
        applied, marked_from = self._applied(uid)
        if applied == wanted and self.ray_object(uid) is not None:
            if outcome.memo_key is None or marked_from == outcome.memo_key:
                return None
            # The same set, built by a changed operator: the marker says so, or every start would build it again.
            return Plan(uid, wanted, [[marker]], False, outcome.ray_kind)
        created = self.caches.ray_objects.get(uid) is None
        if created:  # first creation (or after a restart): make sure the names are ours to take
            self._check_names_free(body, outcome)
        return Plan(uid, wanted, rounds, created and holds(outcome.children, outcome.ray_kind), outcome.ray_kind)

    async def _apply_first(self, plan: Plan) -> None:
        """The first round: with the Ray object in it, the work starts."""
        await self._apply_round(plan, plan.rounds[0])

    async def _apply_rest(self, plan: Plan) -> None:
        """The other rounds, the marker last. Once the Ray object exists they yield to Ray objects being created
        (in a burst, every job starts before any job's supporting objects are written). Waiting, they count as
        children in flight: a status write released by the same lull still waits for them."""
        with self._children.busy():
            if len(plan.rounds) > 1 and holds(plan.rounds[0], plan.ray_kind):
                await self._after_creations()
            for children in plan.rounds[1:]:
                await self._apply_round(plan, children)
        self.expected.applied(plan.uid, plan.wanted, plan.fresh)

    async def _apply_round(self, plan: Plan, children: list[dict[str, Any]]) -> None:
        creating = plan.created and holds(children, plan.ray_kind)
        with self._creations.busy() if creating else contextlib.nullcontext(), self._children.busy():
            applied = await asyncio.gather(*(self._apply_one(c) for c in children))
        for child, result in zip(children, applied):
            if creating and child["kind"] == plan.ray_kind and result:
                plan.fresh = plain(result, spec=False)   # as the index keeps it

    async def _after_creations(self) -> None:
        """Supporting children yield to Ray objects being created: in a burst, all the work starts first, and
        what it needs later follows."""
        await self._creations.wait(STATUS_DEFER_SECONDS)

    async def _after_children(self) -> None:
        """Status writes and events yield to children being applied (the Ray objects' creations first): in a
        burst, every resource gets its children before any reports where it stands."""
        await self._children.wait(STATUS_DEFER_SECONDS)

    async def _apply_one(self, child: dict[str, Any]) -> dict[str, Any] | None:
        if not is_shared(child):
            self.metrics.child_writes += 1
            applied = await with_retries(lambda: self.kube.apply(child))
            self.expected.wrote(applied)
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
        status = status_for(body, outcome.verdict)
        comparable = {k: v for k, v in current.items() if k in status}
        if same_status(comparable, status) and set(current) <= set(status):
            return
        await self._after_children()
        written = await with_retries(lambda: self.kube.apply_status(body["apiVersion"], body["kind"],
                                                                    meta["namespace"], meta["name"], status))
        self.expected.wrote(written)
        self.expected.wrote_status(meta["uid"], meta.get("resourceVersion", ""), status)
        self.metrics.status_writes += 1
        if current.get("phase") != outcome.verdict.phase:
            await self._post_event(body, outcome.verdict)

    async def _post_event(self, body: dict[str, Any], verdict: Verdict) -> None:
        try:
            await self.kube.create(event_for(body, verdict))
        except ApiError as e:  # an event is best effort: status already says it
            if not e.namespace_ending:
                log.info("could not post event for %s: %s", body["metadata"]["name"], e)

