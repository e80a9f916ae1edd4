"""Recorded rows -> Binance's frames again, in the order they were received.

`frames` rebuilds a row's payload and stream name; `events` walks a time window.
"""

from worker.replay.events import events

__all__ = ["events"]
