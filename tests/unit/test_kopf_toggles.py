"""The counting ToggleSet: same answers as kopf's, in O(1), waking waiters only when the set's state flips."""

from __future__ import annotations

import asyncio
import random

from kopf._cogs.aiokits import aiotoggles

from llmops.handlers.kopf_toggles import CountingToggleSet


def test_same_state_as_kopfs_set_through_random_changes():
    async def run():
        rng = random.Random(7)
        for fn in (all, any):
            ours, theirs = CountingToggleSet(fn), aiotoggles.ToggleSet(fn)
            pairs = []
            for _ in range(400):
                action = rng.choice(["make", "make", "turn", "drop"])
                if action == "make" or not pairs:
                    state = rng.random() < 0.5
                    pairs.append((await ours.make_toggle(state), await theirs.make_toggle(state)))
                elif action == "turn":
                    a, b = rng.choice(pairs)
                    state = rng.random() < 0.5
                    await a.turn_to(state)
                    await b.turn_to(state)
                else:
                    a, b = pairs.pop(rng.randrange(len(pairs)))
                    await ours.drop_toggle(a)
                    await theirs.drop_toggle(b)
                    await a.turn_to(not a.is_on())   # a dropped toggle no longer counts
                assert ours.is_on() == theirs.is_on(), (fn.__name__, action)
                assert len(ours) == len(theirs)
    asyncio.run(run())


def test_waiters_wake_once_when_the_last_toggle_is_dropped():
    async def run():
        toggles = CountingToggleSet(all)
        blockers = [await toggles.make_toggle(False) for _ in range(2000)]
        woke = 0

        async def waiter():
            nonlocal woke
            await toggles.wait_for(True)
            woke += 1
        waiters = [asyncio.create_task(waiter()) for _ in range(2000)]
        await asyncio.sleep(0)
        for toggle in blockers[:-1]:
            await toggles.drop_toggle(toggle)
        await asyncio.sleep(0)
        assert woke == 0 and not toggles.is_on()
        await toggles.drop_toggle(blockers[-1])
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert woke == 2000 and toggles.is_on()
    asyncio.run(run())
