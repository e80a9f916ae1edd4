"""Counters that tests read through GET /fake/stats.

`sent` counts events as they are written to a socket, not as they are produced,
so a test can compare what a client stored with what actually left the server.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class _Tally:
    __slots__ = ("count", "first", "last")

    def __init__(self) -> None:
        self.count = 0
        self.first: int | None = None
        self.last: int | None = None

    def add(self, ident: int | None) -> None:
        self.count += 1
        if ident is not None:
            self.first = ident if self.first is None else min(self.first, ident)
            self.last = ident if self.last is None else max(self.last, ident)

    def add_range(self, idents: tuple[int, int] | None, count: int) -> None:
        """`count` messages at once, whose ids (if any) span `idents` (first, last)."""
        self.count += count
        if idents is not None:
            first, last = idents
            self.first = first if self.first is None else min(self.first, first)
            self.last = last if self.last is None else max(self.last, last)

    def as_dict(self) -> dict[str, int]:
        if self.first is None or self.last is None:
            return {"count": self.count}
        return {"first": self.first, "last": self.last, "count": self.count}


class Stats:
    """Connection, websocket-send and REST counters; `reset` zeroes them all."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.opened_total = 0
        self.closed_for_rate_limit = 0
        self.closed_for_missing_pong = 0
        self.dropped_by_chaos = 0
        self.messages_sent_total = 0
        self.rest_requests = 0
        self.rest_by_status: Counter[str] = Counter()
        self._max_open_per_streamset: dict[str, int] = {}
        self._sent: dict[tuple[str, str], _Tally] = {}

    def record_sent(self, symbol: str | None, kind: str | None, ident: int | None) -> None:
        """Count one written websocket message; symbol None = not a data event."""
        self.messages_sent_total += 1
        if symbol is None or kind is None:
            return
        tally = self._sent.get((symbol, kind))
        if tally is None:
            tally = self._sent[(symbol, kind)] = _Tally()
        tally.add(ident)

    def record_sent_range(self, symbol: str, kind: str, idents: tuple[int, int] | None, count: int) -> None:
        """Count `count` written messages of one stream at once (the market-load mode)."""
        self.messages_sent_total += count
        tally = self._sent.get((symbol, kind))
        if tally is None:
            tally = self._sent[(symbol, kind)] = _Tally()
        tally.add_range(idents, count)

    def note_streamset(self, key: str, open_count: int) -> None:
        """Remember the most connections ever open at once with one stream set.

        A recorder that opens a duplicate connection for the same streams shows
        up here as a count of 2.
        """
        if open_count > self._max_open_per_streamset.get(key, 0):
            self._max_open_per_streamset[key] = open_count

    def record_rest(self, status: int) -> None:
        self.rest_requests += 1
        self.rest_by_status[str(status)] += 1

    def snapshot(self, open_connections: list[dict[str, Any]], weight_used: int) -> dict[str, Any]:
        sent: dict[str, dict[str, dict[str, int]]] = {}
        for (symbol, kind), tally in sorted(self._sent.items()):
            sent.setdefault(symbol, {})[kind] = tally.as_dict()
        return {
            "connections": {
                "open": len(open_connections),
                "opened_total": self.opened_total,
                "max_open_per_streamset": dict(self._max_open_per_streamset),
                "closed_for_rate_limit": self.closed_for_rate_limit,
                "closed_for_missing_pong": self.closed_for_missing_pong,
                "dropped_by_chaos": self.dropped_by_chaos,
            },
            "open_connections": open_connections,
            "sent": sent,
            "rest": {
                "requests": self.rest_requests,
                "by_status": dict(self.rest_by_status),
                "weight_used_this_minute": weight_used,
            },
            "messages_sent_total": self.messages_sent_total,
        }
