"""The publisher: one loop that turns the market's clock into events for subscribers.

Every ~10 ms it publishes the trades whose time has passed since the previous tick
(trade, aggTrade, bookTicker and blockTrade streams), the final kline of every window
that has just closed, at each 100 ms boundary the fast depth streams, and at each
second boundary the timed streams (tickers, avgPrice, referencePrice, all-market
arrays and the 1000 ms depth streams every second; klines every 2 s, `1s` klines
every second). Each payload is encoded once per stream and handed to every
subscriber of that stream, so the cost is per event, not per event and connection.

Each diff-depth stream remembers the last update id it published, so its events
chain `U = previous u + 1` for every subscriber; a subscriber who joins an existing
stream starts at its next event, as on Binance.
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
    "windowTicker": "second",
    "kline": "kline",
    "miniTicker@arr": "all_market",
    "windowTicker@arr": "all_market",
    "depth": "book",
    "partialDepth": "book",
}
log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


class Subscriber(Protocol):
    """A websocket session as the hub and the test controls see it (`ws.Session`)."""

    id: int

    def stream_names(self) -> list[str]: ...

    def deliver(self, stream: bytes, payload: bytes, symbol: str, kind: str, ident: int | None) -> None: ...

    def info(self) -> dict[str, Any]: ...

    def announce_shutdown(self, grace_seconds: float) -> None: ...

    def close_soon(self, code: int = 1000, reason: str = "") -> None: ...

    def abort(self) -> None: ...


class _Stream:
    """One subscribed stream: its spec, encoded name and current subscribers."""

    __slots__ = ("spec", "name", "index", "subscribers", "open_ms", "close_ms", "book_id")

    def __init__(self, spec: StreamSpec, index: int, now: int, book_id: int) -> None:
        self.spec = spec
        self.name = spec.name.encode()
        self.index = index
        self.subscribers: set[Subscriber] = set()
        # For kline streams: the window whose final (closed) kline is still due.
        self.open_ms = 0
        self.close_ms = 0
        if spec.kind == "kline":
            self.roll_window(now)
        # For diff-depth streams: the last update id already published.
        self.book_id = book_id

    def roll_window(self, now: int) -> None:
        self.open_ms = intervals.window_start(self.spec.interval or "", now)
        self.close_ms = intervals.next_start(self.spec.interval or "", self.open_ms) - 1


class Hub:
    """Registry of open sessions and their streams, plus the publishing loop."""

    def __init__(self, market: Market, stats: Stats, halted: frozenset[str] = frozenset()) -> None:
        self._market = market
        self._stats = stats
        self.halted = halted
        self.sessions: dict[int, Subscriber] = {}
        self._streams: dict[str, _Stream] = {}
        # Deliverable streams by category; streams of unlisted symbols are in none.
        self._categories: dict[str, dict[str, _Stream]] = {c: {} for c in _CATEGORIES.values()}
        self._cursor = market.last_n(now_ms())
        self._next_second = 0
        self._next_tenth = 0
        self._paused_until = 0
        self._muted_until: dict[str, int] = {}  # stream name -> epoch ms

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
            now = now_ms()
            stream = _Stream(spec, index, now, self._market.book_id_at(now))
            self._streams[spec.name] = stream
            if spec.symbol or spec.name in streams.ALL_MARKET:
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

    def mute(self, stream_name: str, seconds: float) -> None:
        """Publish nothing on one stream for `seconds` (0: at once again), while its
        connections and their other streams go on: a stream Binance stopped sending."""
        self._muted_until[stream_name] = now_ms() + int(seconds * 1000)

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
            self._skip_book_updates(now)
            return
        if last >= first:
            self._publish_trades(first, last, now)
        self._publish_closed_klines(now)
        whole_second = now >= self._next_second
        if now >= self._next_tenth:
            self._next_tenth = (now // 100 + 1) * 100
            self._publish_books(now, whole_second)
        if whole_second:
            self._next_second = (now // 1000 + 1) * 1000
            self._publish_timed(now, even_second=(now // 1000) % 2 == 0)

    def _publish_trades(self, first: int, last: int, now: int) -> None:
        trades: dict[int, list[Trade]] = {}
        for stream in self._categories["trade"].values():
            if stream.spec.kind == "blockTrade":
                self._publish_block_trades(stream, first, last, now)
                continue
            batch = trades.get(stream.index)
            if batch is None:
                batch = trades[stream.index] = [self._market.trade(stream.index, n) for n in range(first, last + 1)]
            build = self._trade_builder(stream)
            for trade in batch:
                payload, ident = build(trade, now)
                self._fan_out(stream, payload, ident)

    def _publish_block_trades(self, stream: _Stream, first: int, last: int, now: int) -> None:
        for n in range(first, last + 1):
            block = self._market.block_trade(stream.index, n)
            if block is not None:
                payload = streams.block_trade_event(stream.spec.symbol or "", block, now)
                self._fan_out(stream, payload, block.id)

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

    def _publish_books(self, now: int, whole_second: bool) -> None:
        """Diff and partial depth streams due now (every 100 ms, or each second)."""
        book_id = self._market.book_id_at(now)
        for stream in self._categories["book"].values():
            if stream.spec.every_ms == 100 or whole_second:
                self._publish_book(stream, book_id, now)

    def _publish_book(self, stream: _Stream, book_id: int, now: int) -> None:
        spec, index = stream.spec, stream.index
        if spec.kind == "partialDepth":
            view = self._market.book_view(index, book_id, spec.levels)
            self._fan_out(stream, streams.partial_depth_event(view), book_id)
        elif book_id > stream.book_id:  # Binance sends no diff when nothing changed
            diff = self._market.order_book(index).diff(stream.book_id + 1, book_id)
            stream.book_id = book_id
            payload = streams.depth_update_event(spec.symbol or "", diff, now)
            self._fan_out(stream, payload, book_id)

    def _skip_book_updates(self, now: int) -> None:
        """While paused, updates are lost like trades: the next diff starts after a gap."""
        book_id = self._market.book_id_at(now)
        for stream in self._categories["book"].values():
            stream.book_id = book_id

    def _publish_timed(self, now: int, even_second: bool) -> None:
        windows: dict[tuple[int, int], WindowStats] = {}

        def stats(index: int, length_ms: int) -> WindowStats:
            """Stats of the window ending now, computed once per symbol and length."""
            key = (index, length_ms)
            if key not in windows:
                windows[key] = self._market.window(index, now - length_ms, now)
            return windows[key]

        for stream in self._categories["kline"].values():
            if even_second or stream.spec.interval == "1s":
                self._publish_kline(stream, now)
        for stream in self._categories["second"].values():
            self._fan_out(stream, self._timed_payload(stream, stats, now), None)
        for stream in self._categories["all_market"].values():
            self._fan_out(stream, self._all_market_payload(stream, stats, now), None)

    def _all_market_payload(self, stream: _Stream, stats: Callable[[int, int], WindowStats], now: int) -> bytes:
        """Every listed symbol's ticker: all of them trade, so all changed."""
        window = stream.spec.interval
        if window is None:
            return streams.encode(
                [
                    streams.mini_ticker(symbol, stats(i, streams.DAY_MS), now)
                    for i, symbol in enumerate(self._market.symbols)
                ]
            )
        length = streams.TICKER_WINDOWS[window]
        return streams.encode(
            [
                streams.window_ticker(symbol, window, stats(i, length), now)
                for i, symbol in enumerate(self._market.symbols)
            ]
        )

    def _timed_payload(self, stream: _Stream, stats: Callable[[int, int], WindowStats], now: int) -> bytes:
        spec, index = stream.spec, stream.index
        symbol, kind = spec.symbol or "", spec.kind
        if kind == "avgPrice":
            return streams.avg_price_event(symbol, stats(index, streams.AVG_PRICE_MS), now)
        if kind == "referencePrice":
            return streams.reference_price_event(symbol, self._reference_price(symbol, index), now)
        if kind == "windowTicker" and spec.interval:
            length = streams.TICKER_WINDOWS[spec.interval]
            return streams.encode(streams.window_ticker(symbol, spec.interval, stats(index, length), now))
        if kind == "miniTicker":
            return streams.mini_ticker_event(symbol, stats(index, streams.DAY_MS), now)
        last_trade = self._market.trade(index, max(self._cursor, 0))
        return streams.ticker_event(symbol, stats(index, streams.DAY_MS), self._market.book(index, last_trade), now)

    def _reference_price(self, symbol: str, index: int) -> float | None:
        """The book's mid; None (JSON null) for halted symbols, which have none."""
        if symbol in self.halted:
            return None
        return self._market.mid_price(index, max(self._cursor, 0))

    def _publish_kline(self, stream: _Stream, now: int) -> None:
        """Publish the kline of the stream's pending window as it stands now."""
        spec = stream.spec
        kline = self._market.kline(stream.index, spec.interval or "", stream.open_ms, now)
        self._fan_out(stream, streams.kline_event(spec.symbol or "", spec.interval or "", kline, now), None)

    def _fan_out(self, stream: _Stream, payload: bytes, ident: int | None) -> None:
        if self._muted_until and self._muted_until.get(stream.spec.name, 0) > now_ms():
            return
        symbol, kind = stream.spec.symbol or streams.ALL_SYMBOLS, stream.spec.stat_kind
        for session in stream.subscribers:
            session.deliver(stream.name, payload, symbol, kind, ident)


def _streamset_key(session: Subscriber) -> str:
    return "/".join(sorted(session.stream_names()))
