"""The bound on reconciles that build and apply at once, served first come first served, re-listed ones last."""

from __future__ import annotations

import asyncio
import collections
import contextlib


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
