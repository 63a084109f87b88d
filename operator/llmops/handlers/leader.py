"""Leader election through a coordination.k8s.io Lease, as controller-runtime and client-go do it.

One replica holds the Lease and reconciles; the others wait. The holder renews it; a waiting replica takes it
over once it has seen the same record, unrenewed, for a whole lease duration (its own clock: the holder's clock
is never compared with ours), or at once when the holder released it on a graceful stop. A waiting replica
watches the Lease rather than reading it over and over: it sends no request while it waits, and acts on a release
as soon as the watch shows it. A holder that could not renew for the renew deadline stops leading (the process
exits, and its pod comes back as a waiting replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from datetime import datetime, timezone
from typing import Any

import aiohttp

from ..kube import ApiError, Kube, path_of
from .informers import Informer, Watched

log = logging.getLogger("llmops")

LEASE_SECONDS = 60           # how long a record unrenewed means its holder is gone
RENEW_SECONDS = 20           # how often the holder renews
RETRY_SECONDS = 5            # how often a waiting replica not allowed to watch the Lease reads it instead
READ = object()              # _try's default: read the Lease first
LEASE_API = "coordination.k8s.io/v1"
RENEW_DEADLINE_SECONDS = 45  # a holder that could not renew for this long stops leading (before others take over)


def now_micro() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Leader:
    def __init__(self, kube: Kube, name: str, namespace: str, identity: str, lease_seconds: float = LEASE_SECONDS,
                 renew_seconds: float = RENEW_SECONDS, deadline_seconds: float = RENEW_DEADLINE_SECONDS,
                 retry_seconds: float = RETRY_SECONDS):
        self.kube = kube
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self.deadline_seconds = deadline_seconds
        self.retry_seconds = retry_seconds
        self.path = path_of(LEASE_API, "Lease", namespace)            # where a Lease is created
        self.lease_path = path_of(LEASE_API, "Lease", namespace, name)  # ours
        self.leading = False
        self._observed: tuple[Any, float] = (None, 0.0)   # the other holder's record, when we first saw it
        self._mine: dict | None = None                    # the record as we last wrote it, while leading
        self._renewed = 0.0

    async def acquire(self) -> None:
        """Return once this replica holds the Lease."""
        if not await self._look():
            log.info("waiting to lead: Lease %s/%s is held by %s", self.namespace, self.name,
                     self._observed[0][0] if self._observed[0] else "?")
            await self._wait_to_lead()
        log.info("leading: holding Lease %s/%s as %s", self.namespace, self.name, self.identity)

    async def _wait_to_lead(self) -> None:
        """Watch the Lease while another holds it: each change is looked at as it comes, and the record is taken
        over once it has stood unrenewed for its duration. An API server that does not answer for a while is
        waited out, not a reason to stop."""
        changed = asyncio.Event()
        lease = Watched(LEASE_API, "Lease", lambda body: {"lease": body},
                        trigger=lambda _, __: changed.set(), fields=f"metadata.name={self.name}")
        informer = Informer(self.kube, lease, self.namespace)
        if not await self._listed(informer):   # e.g. a chart from before the watch: no list and watch granted
            while not await self._look():
                await asyncio.sleep(self.retry_seconds)
            return
        following = asyncio.create_task(informer.follow())
        try:
            while not await self._look((lease.index.get("lease") or (None,))[0]):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._until_expired())
                changed.clear()
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)

    async def _listed(self, informer: Informer) -> bool:
        """List the Lease for the watch to start from; False when that is refused (then it is read at intervals)."""
        while True:
            try:
                await informer.list()
                return True
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if isinstance(e, ApiError) and e.status == 403:
                    log.warning("cannot watch the Lease %s/%s (%s): reading it every %s s instead",
                                self.namespace, self.name, e.message, self.retry_seconds)
                    return False
                await self._after_failure("listing", e)

    async def _look(self, seen: Any = READ) -> bool:
        """`_try`, with a moment of the API server not answering counted as not leading yet."""
        try:
            return await self._try(seen)
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            await self._after_failure("looking at", e)
            return False

    async def _after_failure(self, doing: str, e: Exception) -> None:
        """A request on the Lease failed: raise a refusal; wait out an API server that did not answer."""
        if isinstance(e, ApiError) and not e.transient:
            raise e
        log.warning("%s the Lease %s/%s failed (%s): again in %s s", doing, self.namespace, self.name, e,
                    self.retry_seconds)
        await asyncio.sleep(self.retry_seconds)

    def _until_expired(self) -> float:
        """Seconds until the record we last saw has stood unrenewed for its duration (then it is ours to take)."""
        record, since = self._observed
        duration = self._duration(record[2] if record else None)
        return max(0.0, since + duration - time.monotonic()) + 0.01   # just past it: _expired asks for more

    async def keep(self) -> None:
        """Renew while leading; return when leadership is lost (another holder, or no renewal for the deadline)."""
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                if not await self._try():
                    log.error("lost the Lease %s/%s to %s", self.namespace, self.name, self._observed[0])
                    break
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if time.monotonic() - self._renewed > self.deadline_seconds:
                    log.error("could not renew the Lease %s/%s for %s s: %s", self.namespace, self.name,
                              self.deadline_seconds, e)
                    break
                log.warning("renewing the Lease %s/%s failed: %s", self.namespace, self.name, e)
        self.leading = False

    async def release(self) -> None:
        """On a graceful stop: leave the Lease free, so that a waiting replica takes over at once."""
        if not self.leading:
            return
        self.leading = False
        lease = await self._get()
        self._mine = None
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        lease["spec"].update({"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": now_micro()})
        try:
            await self.kube.read("PUT", self.lease_path, body=lease)
            log.info("released the Lease %s/%s", self.namespace, self.name)
        except ApiError as e:
            log.warning("could not release the Lease %s/%s: %s", self.namespace, self.name, e)

    async def _get(self) -> dict | None:
        try:
            return await self.kube.read("GET", self.lease_path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def _try(self, seen: Any = READ) -> bool:
        """One look at the Lease (as `seen` by the watch, None: not there; else read now): take it or renew it
        where that is ours to do. True while this replica leads. A leader renews the record it wrote last without
        reading it first; a conflict means somebody else wrote it since, and it is read again."""
        stamp = now_micro()
        if self._mine is not None:
            mine, self._mine = self._mine, None
            mine["spec"]["renewTime"] = stamp
            if await self._write("PUT", self.lease_path, mine):
                return True
            seen = READ
        lease = await self._get() if seen is READ else copy.deepcopy(seen)
        if lease is None:
            return await self._write("POST", self.path, {
                "apiVersion": LEASE_API, "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(stamp, stamp, 0)})
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity and not self._expired(spec):
            self.leading = False
            self._mine = None
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.identity)
        acquired = spec.get("acquireTime") if holder == self.identity else stamp
        lease["spec"] = self._spec(acquired or stamp, stamp, transitions)
        return await self._write("PUT", self.lease_path, lease)

    def _expired(self, spec: dict) -> bool:
        """The other holder's record unchanged for a whole lease duration, by our clock."""
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self._observed[0]:
            self._observed = (record, time.monotonic())
            return False
        return time.monotonic() - self._observed[1] > self._duration(spec.get("leaseDurationSeconds"))

    def _duration(self, written: Any) -> float:
        """A record's lease duration: as its holder wrote it, else ours."""
        return float(written or self.lease_seconds)

    def _spec(self, acquired: str, renewed: str, transitions: int) -> dict:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_seconds),
                "acquireTime": acquired, "renewTime": renewed, "leaseTransitions": transitions}

    async def _write(self, method: str, path: str, body: dict) -> bool:
        try:
            written = await self.kube.read(method, path, body=body)
        except ApiError as e:
            if e.status == 409:   # somebody else wrote it first: look again next time
                return False
            raise
        self._mine = written
        self._renewed = time.monotonic()
        self.leading = True
        return True
