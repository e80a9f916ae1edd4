"""The clock of a replay session: one time shared by its sockets and its REST answers.

It stands at the window's start until the first subscription, then runs at `speed`
times real time (None: as fast as the clients read). It never runs past the next
event that has not been sent yet: the sender moves that limit forward, and a sender
held up by a slow client (its socket's buffer full) holds the clock with it, so a
REST answer is never ahead of the frames already sent.
"""

from __future__ import annotations

import asyncio
import time

LATE_MS = 100
"""Wall-clock milliseconds the sender may fall behind before the clock is set back to
it (a slow client slows the clock instead of the replay hurrying to catch up)."""


class ReplayClock:
    """Replay time in ms since the epoch, as Binance's times are."""

    def __init__(self, start_ms: int, speed: float | None) -> None:
        self.speed = speed
        self._limit = start_ms  # the clock does not pass the next unsent event
        self._anchor_ms = start_ms
        self._anchor_wall: float | None = None  # None until the first subscription
        self._started = asyncio.Event()

    @property
    def started(self) -> bool:
        return self._anchor_wall is not None

    def start(self) -> None:
        """Let the clock run (the first subscription of the session)."""
        if self._anchor_wall is None:
            self._anchor_wall = time.monotonic()
            self._started.set()

    def now(self) -> int:
        if self._anchor_wall is None or self.speed is None:
            return self._limit
        return min(self._limit, self._running())

    def _running(self) -> int:
        assert self._anchor_wall is not None and self.speed is not None
        return self._anchor_ms + int((time.monotonic() - self._anchor_wall) * 1000 * self.speed)

    async def reach(self, at_ms: int) -> None:
        """Wait until the clock may stand at `at_ms` (the time of the next event to
        send), then let it. At `max` speed that is at once, once started."""
        await self._started.wait()
        if self.speed is not None:
            ahead = at_ms - self._running()
            if ahead > 0:
                self._limit = at_ms
                await asyncio.sleep(ahead / 1000 / self.speed)
            elif -ahead > LATE_MS * self.speed:  # the sender was held up: the clock waited for it
                self._anchor_ms, self._anchor_wall = at_ms, time.monotonic()
        self._limit = max(self._limit, at_ms)
