"""The replay clock on its own: standing until the first subscription, paced by speed,
never past the next unsent event, and held back by a sender that was held up."""

from __future__ import annotations

import asyncio
import time

from worker.replay.clock import ReplayClock

START = 1_796_600_000_000


def test_it_stands_at_the_start_until_started_and_reach_waits_for_that() -> None:
    async def scenario() -> tuple[int, bool, int]:
        clock = ReplayClock(START, speed=None)
        waiting = asyncio.create_task(clock.reach(START + 5_000))
        await asyncio.sleep(0.05)
        before = clock.now()
        still_waiting = not waiting.done()
        clock.start()
        await waiting
        return before, still_waiting, clock.now()

    before, still_waiting, after = asyncio.run(scenario())
    assert before == START and still_waiting
    assert after == START + 5_000  # at max speed the clock is the last event let through


def test_at_a_speed_it_runs_that_many_times_real_time_and_stops_at_the_next_event() -> None:
    async def scenario() -> tuple[float, int, int]:
        clock = ReplayClock(START, speed=20)
        clock.start()
        began = time.monotonic()
        await clock.reach(START + 2_000)  # 2 s of recording at 20x: 0.1 s
        waited = time.monotonic() - began
        at_event = clock.now()
        await asyncio.sleep(0.1)  # the next event is not reached yet: the clock waits at this one
        return waited, at_event, clock.now()

    waited, at_event, later = asyncio.run(scenario())
    assert 0.09 <= waited < 1.5  # not the 2 s of real time
    assert at_event == later == START + 2_000


def test_a_sender_held_up_holds_the_clock_instead_of_hurrying_after() -> None:
    async def scenario() -> tuple[int, float]:
        clock = ReplayClock(START, speed=10)
        clock.start()
        await clock.reach(START + 100)
        time.sleep(0.3)  # a slow client held the sender: 3 s of replay time went by unsent
        await clock.reach(START + 200)
        resumed = clock.now()
        began = time.monotonic()
        # 2 s of replay time after where it resumed: 0.2 s at 10x. A clock that had run on
        # during the stall (past START + 3,100 by now) would let this through at once.
        await clock.reach(START + 2_200)
        return resumed, time.monotonic() - began

    resumed, waited = asyncio.run(scenario())
    assert resumed == START + 200
    assert waited >= 0.15
