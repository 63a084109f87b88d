"""The bound on reconciles that build and apply at once, served first come first served, re-listed ones last; and
the waits that order a burst's work."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, Callable


class Slots:
    """A semaphore whose waiters come in two classes: a freed slot goes to the first waiter of the first class,
    and to the second class only when the first has none. After a restart the re-listed resources wait in the
    second class, so a resource created meanwhile does not queue behind thousands that are at rest."""

    def __init__(self, limit: int):
        self._free = limit
        self._waiting: tuple[collections.deque, collections.deque] = (collections.deque(), collections.deque())

    @contextlib.asynccontextmanager
    async def slot(self, later: bool = False):
        if self._free > 0 and not any(self._waiting):
            self._free -= 1
        else:
            queue = self._waiting[1 if later else 0]
            granted = asyncio.get_running_loop().create_future()
            queue.append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._release()   # handed a slot just as the waiter was cancelled: pass it on
                elif granted in queue:
                    queue.remove(granted)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for queue in self._waiting:
            while queue:
                granted = queue.popleft()
                if not granted.done():
                    granted.set_result(None)
                    return
        self._free += 1


class Lull:
    """Counts work in flight, for other work that should wait until there is none: `wait` returns once nothing
    has been in flight for `quiet` seconds (the members of a burst come closer than that), or after `limit`."""

    def __init__(self, quiet: float):
        self._quiet_s = quiet
        self._busy = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._timer: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def busy(self):
        self._busy += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = asyncio.get_running_loop().call_later(self._quiet_s, self._mark_quiet)

    def _mark_quiet(self) -> None:
        self._timer = None
        if not self._busy:
            self._quiet.set()

    async def wait(self, limit: float) -> None:
        if not self._quiet.is_set() and limit > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), limit)


class Gathered:
    """Keys that keep coming in a stream, handed on together once the stream stops: `start` gets them when none has
    come for `quiet` seconds, or once the first has waited `limit`."""

    def __init__(self, quiet: float, limit: float, start: Callable[[list[Any]], None]):
        self._quiet_s, self._limit_s, self._start = quiet, limit, start
        self._keys: dict[Any, None] = {}
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def __bool__(self) -> bool:
        return bool(self._keys)

    def add(self, key: Any) -> None:
        self._keys[key] = None
        self._last = time.monotonic()
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._quiet_s, self._due, self._last)

    def discard(self, key: Any) -> None:
        self._keys.pop(key, None)

    def _due(self, since: float) -> None:
        now = time.monotonic()
        if now - self._last < self._quiet_s and now - since < self._limit_s:
            self._timer = asyncio.get_running_loop().call_at(self._last + self._quiet_s, self._due, since)
            return
        self._timer = None
        keys, self._keys = list(self._keys), {}
        self._start(keys)
