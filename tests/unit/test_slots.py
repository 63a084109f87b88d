"""Engine slots: at most `limit` holders; a freed slot goes to the first-class waiters before the later ones. The
lull that other writes wait for. Keys gathered while a stream of them lasts."""

from __future__ import annotations

import asyncio

from llmops.handlers.slots import Gathered, Lull, Slots


def test_changed_resources_go_before_relisted_ones():
    async def run():
        slots, order, held = Slots(2), [], 0
        gate = asyncio.Event()

        async def work(name: str, later: bool):
            nonlocal held
            async with slots.slot(later=later):
                held += 1
                assert held <= 2
                order.append(name)
                await gate.wait()
                held -= 1
        first = [asyncio.create_task(work(f"listed-{i}", True)) for i in range(2)]   # take both slots
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(work(f"listed-{i}", True)) for i in range(2, 6)]
        await asyncio.sleep(0)
        new = asyncio.create_task(work("new", False))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*first, *waiting, new), 5)
        assert order[:3] == ["listed-0", "listed-1", "new"]
        assert sorted(order) == sorted(["new", *(f"listed-{i}" for i in range(6))])
    asyncio.run(run())


def test_a_cancelled_waiter_does_not_lose_a_slot():
    async def run():
        slots = Slots(1)
        release = asyncio.Event()

        async def hold():
            async with slots.slot():
                await release.wait()
        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(hold())
        await asyncio.sleep(0)
        cancelled.cancel()
        release.set()
        await holder
        await asyncio.gather(cancelled, return_exceptions=True)
        async with slots.slot():   # the slot came back
            pass
        assert slots._free == 1
    asyncio.run(run())


def test_a_lull_waits_for_work_in_flight_then_its_quiet_time_and_never_past_its_limit():
    async def run():
        lull, loop = Lull(0.05), asyncio.get_running_loop()
        start = loop.time()
        await lull.wait(1.0)
        assert loop.time() - start < 0.01   # nothing in flight: no wait

        async def work(seconds: float):
            with lull.busy():
                await asyncio.sleep(seconds)
        task = asyncio.create_task(work(0.1))
        await asyncio.sleep(0)
        start = loop.time()
        await lull.wait(1.0)
        assert 0.14 <= loop.time() - start < 0.5   # the work, then the quiet time
        await task

        task = asyncio.create_task(work(1.0))
        await asyncio.sleep(0)
        start = loop.time()
        await lull.wait(0.2)
        assert 0.19 <= loop.time() - start < 0.5   # gave up at the limit, the work still in flight
        task.cancel()
    asyncio.run(run())


def test_gathered_keys_go_on_together_once_their_stream_stops_or_has_lasted_too_long():
    async def run():
        handed: list[list] = []
        gathered = Gathered(0.05, 10.0, handed.append)
        for i in range(5):   # a stream of keys, closer together than the quiet time
            gathered.add(i)
            await asyncio.sleep(0.02)
        gathered.discard(3)
        assert handed == [] and gathered
        await asyncio.sleep(0.1)
        assert handed == [[0, 1, 2, 4]] and not gathered

        endless = Gathered(0.05, 0.2, handed.append)
        for i in range(20):   # never quiet: handed on at the limit all the same
            endless.add(i)
            await asyncio.sleep(0.02)
        assert len(handed) == 2 and handed[1][0] == 0
    asyncio.run(run())
