"""The mapping between trade numbers and trade times, shared by every symbol.

All symbols trade at the same rate from the same genesis, so trade number n has the
same time for each of them; one clock serves all. The clock is a list of segments
(first trade number, time of that trade, rate) so that the rate can change at run
time without rewriting history: trades before the change keep their times, trade
numbers stay consecutive and times stay monotonic.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class _Segment:
    first_n: int
    start_ms: int
    ms_per_trade: float

    def time_of(self, n: int) -> int:
        return self.start_ms + int((n - self.first_n) * self.ms_per_trade)


class TradeClock:
    """Trade number <-> time (ms). Pure apart from explicit `set_rate` calls."""

    def __init__(self, genesis_ms: int, trades_per_second: float) -> None:
        _check_rate(trades_per_second)
        self._segments = [_Segment(0, genesis_ms, 1000.0 / trades_per_second)]
        self._first_ns = [0]
        self._start_ms = [genesis_ms]

    @property
    def genesis_ms(self) -> int:
        return self._segments[0].start_ms

    @property
    def trades_per_second(self) -> float:
        return 1000.0 / self._segments[-1].ms_per_trade

    def time_of(self, n: int) -> int:
        """Time of trade number n (n >= 0); defined for future trades too."""
        return self._segments[bisect.bisect_right(self._first_ns, n) - 1].time_of(n)

    def last_at(self, t_ms: int) -> int:
        """Largest trade number whose time is <= t_ms; -1 before genesis."""
        i = bisect.bisect_right(self._start_ms, t_ms) - 1
        if i < 0:
            return -1
        seg = self._segments[i]
        last_in_seg = self._segments[i + 1].first_n - 1 if i + 1 < len(self._segments) else None
        n = seg.first_n + int((t_ms - seg.start_ms) / seg.ms_per_trade)
        # Float division can be off by one either way; settle it exactly.
        while n > seg.first_n and seg.time_of(n) > t_ms:
            n -= 1
        while seg.time_of(n + 1) <= t_ms:
            n += 1
        return n if last_in_seg is None else min(n, last_in_seg)

    def first_at_or_after(self, t_ms: int) -> int:
        """Smallest trade number whose time is >= t_ms."""
        return self.last_at(t_ms - 1) + 1

    def set_rate(self, trades_per_second: float, now_ms: int) -> None:
        """Change the rate from the next trade on, leaving past trades untouched.

        The next trade comes one new interval after now, so times stay monotonic
        and no trade that a client may already have seen changes.
        """
        _check_rate(trades_per_second)
        ms_per_trade = 1000.0 / trades_per_second
        last = self._segments[-1]
        if last.start_ms > now_ms:
            # No trade of the newest segment exists yet: only its rate changes.
            self._segments[-1] = _Segment(last.first_n, last.start_ms, ms_per_trade)
            return
        first_n = self.last_at(now_ms) + 1
        start_ms = now_ms + max(1, int(ms_per_trade))
        self._segments.append(_Segment(first_n, start_ms, ms_per_trade))
        self._first_ns.append(first_n)
        self._start_ms.append(start_ms)


def _check_rate(trades_per_second: float) -> None:
    if not trades_per_second > 0:
        raise ValueError("trades_per_second must be > 0")
