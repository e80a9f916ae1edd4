"""The publisher: one loop that turns the market's clock into events for subscribers.

Every ~10 ms it publishes the trades whose time has passed since the previous tick
(trade, aggTrade and bookTicker streams), the final kline of every window that has
just closed, and at each second boundary the timed streams (tickers, avgPrice every
second; klines every 2 s, `1s` klines every second). Each payload is encoded once
per stream and handed to every subscriber of that stream, so the cost is per event,
not per event and connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from fake_binance import intervals, streams
from fake_binance.market import Market, Trade, WindowStats
from fake_binance.stats import Stats
from fake_binance.streams import StreamSpec

TICK_SECONDS = 0.01
_CATEGORIES = {
    **{kind: "trade" for kind in streams.TRADE_KINDS},
    **{kind: "second" for kind in streams.PER_SECOND_KINDS},
    "kline": "kline",
    "miniTicker@arr": "all_market",
}
log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


class Subscriber(Protocol):
    """A websocket session as the hub and the test controls see it (`ws.Session`)."""

    id: int

    def stream_names(self) -> list[str]: ...

    def deliver(
        self, stream: bytes, payload: bytes, symbol: str, kind: str, ident: int | None
    ) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def announce_shutdown(self, grace_seconds: float) -> None: ...

    def close_soon(self, code: int = 1000, reason: str = "") -> None: ...

    def abort(self) -> None: ...


class _Stream:
    """One subscribed stream: its spec, encoded name and current subscribers."""

    __slots__ = ("spec", "name", "index", "subscribers", "open_ms", "close_ms")

    def __init__(self, spec: StreamSpec, index: int, now: int) -> None:
        self.spec = spec
        self.name = spec.name.encode()
        self.index = index
        self.subscribers: set[Subscriber] = set()
        # For kline streams: the window whose final (closed) kline is still due.
        self.open_ms = 0
        self.close_ms = 0
        if spec.interval:
            self.roll_window(now)

    def roll_window(self, now: int) -> None:
        self.open_ms = intervals.window_start(self.spec.interval or "", now)
        self.close_ms = intervals.next_start(self.spec.interval or "", self.open_ms) - 1


class Hub:
    """Registry of open sessions and their streams, plus the publishing loop."""

    def __init__(self, market: Market, stats: Stats) -> None:
        self._market = market
        self._stats = stats
        self.sessions: dict[int, Subscriber] = {}
        self._streams: dict[str, _Stream] = {}
        # Deliverable streams by category; streams of unlisted symbols are in none.
        self._categories: dict[str, dict[str, _Stream]] = {c: {} for c in _CATEGORIES.values()}
        self._cursor = market.last_n(now_ms())
        self._next_second = 0
        self._paused_until = 0

    # -- registry ---------------------------------------------------------------

    def add(self, session: Subscriber) -> None:
        self.sessions[session.id] = session
        self._stats.opened_total += 1

    def remove(self, session: Subscriber) -> None:
        self.sessions.pop(session.id, None)
        for name in session.stream_names():
            self.detach(session, name)

    def attach(self, session: Subscriber, spec: StreamSpec) -> None:
        """Start delivering `spec` to session (from the next tick on)."""
        stream = self._streams.get(spec.name)
        if stream is None:
            index = self._market.index(spec.symbol) if spec.symbol else -1
            stream = self._streams[spec.name] = _Stream(spec, index, now_ms())
            if spec.symbol or spec.kind == "miniTicker@arr":
                self._categories[_CATEGORIES[spec.kind]][spec.name] = stream
        stream.subscribers.add(session)

    def detach(self, session: Subscriber, name: str) -> None:
        stream = self._streams.get(name)
        if stream is None:
            return
        stream.subscribers.discard(session)
        if not stream.subscribers:
            del self._streams[name]
            self._categories[_CATEGORIES[stream.spec.kind]].pop(name, None)

    def note_streamset(self, session: Subscriber) -> None:
        """Record how many open sessions now carry exactly this session's streams."""
        key = _streamset_key(session)
        same = sum(1 for s in self.sessions.values() if _streamset_key(s) == key)
        self._stats.note_streamset(key, same)

    def pause(self, seconds: float) -> None:
        """Publish nothing for `seconds`; trades of the pause are skipped, not queued.

        Clients see a silence followed by a gap in trade ids, as after a stalled
        upstream, and must backfill it over REST.
        """
        self._paused_until = now_ms() + int(seconds * 1000)

    # -- publishing ---------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                self.tick(now_ms())
            except Exception:  # a bug in one tick must not silence the fake for good
                log.exception("publishing tick failed")
            await asyncio.sleep(TICK_SECONDS)

    def tick(self, now: int) -> None:
        last = self._market.last_n(now)
        first, self._cursor = self._cursor + 1, max(self._cursor, last)
        if now < self._paused_until:
            return
        if last >= first:
            self._publish_trades(first, last, now)
        self._publish_closed_klines(now)
        if now >= self._next_second:
            self._next_second = (now // 1000 + 1) * 1000
            self._publish_timed(now, even_second=(now // 1000) % 2 == 0)

    def _publish_trades(self, first: int, last: int, now: int) -> None:
        trades: dict[int, list[Trade]] = {}
        for stream in self._categories["trade"].values():
            batch = trades.get(stream.index)
            if batch is None:
                batch = trades[stream.index] = [
                    self._market.trade(stream.index, n) for n in range(first, last + 1)
                ]
            build = self._trade_builder(stream)
            for trade in batch:
                payload, ident = build(trade, now)
                self._fan_out(stream, payload, ident)

    def _trade_builder(self, stream: _Stream) -> Callable[[Trade, int], tuple[bytes, int | None]]:
        symbol, kind, market, index = (
            stream.spec.symbol or "",
            stream.spec.kind,
            self._market,
            stream.index,
        )
        if kind == "trade":
            return lambda t, now: (streams.trade_event(symbol, t, now), t.id)
        if kind == "aggTrade":
            return lambda t, now: (streams.agg_trade_event(symbol, t, now), t.agg_id)
        return lambda t, now: (streams.book_ticker_event(symbol, market.book(index, t)), None)

    def _publish_closed_klines(self, now: int) -> None:
        for stream in self._categories["kline"].values():
            if now > stream.close_ms:
                self._publish_kline(stream, now)
                stream.roll_window(now)

    def _publish_timed(self, now: int, even_second: bool) -> None:
        day: dict[int, WindowStats] = {}

        def day_stats(index: int) -> WindowStats:
            if index not in day:
                day[index] = self._market.window(index, now - streams.DAY_MS, now)
            return day[index]

        for stream in self._categories["kline"].values():
            if even_second or stream.spec.interval == "1s":
                self._publish_kline(stream, now)
        for stream in self._categories["second"].values():
            self._fan_out(stream, self._timed_payload(stream, day_stats, now), None)
        for stream in self._categories["all_market"].values():
            tickers = [
                streams.mini_ticker(symbol, day_stats(i), now)
                for i, symbol in enumerate(self._market.symbols)
            ]
            self._fan_out(stream, streams.mini_ticker_arr_event(tickers), None)

    def _timed_payload(
        self, stream: _Stream, day_stats: Callable[[int], WindowStats], now: int
    ) -> bytes:
        symbol, kind, index = stream.spec.symbol or "", stream.spec.kind, stream.index
        if kind == "avgPrice":
            window = self._market.window(index, now - streams.AVG_PRICE_MS, now)
            return streams.avg_price_event(symbol, window, now)
        if kind == "miniTicker":
            return streams.mini_ticker_event(symbol, day_stats(index), now)
        last_trade = self._market.trade(index, max(self._cursor, 0))
        return streams.ticker_event(
            symbol, day_stats(index), self._market.book(index, last_trade), now
        )

    def _publish_kline(self, stream: _Stream, now: int) -> None:
        """Publish the kline of the stream's pending window as it stands now."""
        spec = stream.spec
        kline = self._market.kline(stream.index, spec.interval or "", stream.open_ms, now)
        self._fan_out(
            stream, streams.kline_event(spec.symbol or "", spec.interval or "", kline, now), None
        )

    def _fan_out(self, stream: _Stream, payload: bytes, ident: int | None) -> None:
        symbol, kind = stream.spec.symbol or streams.ALL_SYMBOLS, stream.spec.stat_kind
        for session in stream.subscribers:
            session.deliver(stream.name, payload, symbol, kind, ident)


def _streamset_key(session: Subscriber) -> str:
    return "/".join(sorted(session.stream_names()))
