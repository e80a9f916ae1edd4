"""The publisher: one loop that turns the market's clock into events for subscribers.

Every ~10 ms it publishes the trades whose time has passed since the previous tick
(per-trade streams: trade, aggTrade, bookTicker, blockTrade), the final kline of every
window that has just closed, and each timed stream whose period has come round
(on multiples of its `every_ms`: depth every 100/250/500/1000 ms, tickers and mark
prices every second or three, all-market arrays); open klines go out every 2 s
(`1s` klines every second). Each payload is encoded once per stream and handed to
every subscriber of that stream, so the cost is per event, not per event and
connection. What differs between markets, the stream names and payloads, the hub
asks its `streams.Venue`.

Each depth stream remembers the last update id it published, so its diff events
chain (`U = previous u + 1` on spot, `pu = previous u` on futures) for every
subscriber; a subscriber who joins an existing stream starts at its next event, as
on Binance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from fake_binance import intervals, streams
from fake_binance.market import Market, Trade
from fake_binance.stats import Stats
from fake_binance.streams import Moment, StreamSpec, Venue

TICK_SECONDS = 0.01
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
        if spec.category == streams.KLINE:
            self.roll_window(now)
        # For depth streams: the last update id already published.
        self.book_id = book_id

    def roll_window(self, now: int) -> None:
        self.open_ms = intervals.window_start(self.spec.interval or "", now)
        self.close_ms = intervals.next_start(self.spec.interval or "", self.open_ms) - 1


class Hub:
    """Registry of open sessions and their streams, plus the publishing loop."""

    def __init__(self, market: Market, venue: Venue, stats: Stats) -> None:
        self._market = market
        self._venue = venue
        self._stats = stats
        self.sessions: dict[int, Subscriber] = {}
        self._streams: dict[str, _Stream] = {}
        # Deliverable streams: per trade, klines, and timed ones by period (ms).
        self._per_trade: dict[str, _Stream] = {}
        self._klines: dict[str, _Stream] = {}
        self._timed: dict[int, dict[str, _Stream]] = {}
        self._due: dict[int, int] = {}  # period -> time its streams are next due
        self._cursor = market.last_n(now_ms())
        self._next_second = 0
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
            if spec.deliverable:
                self._schedule(stream).setdefault(spec.name, stream)
        stream.subscribers.add(session)

    def detach(self, session: Subscriber, name: str) -> None:
        stream = self._streams.get(name)
        if stream is None:
            return
        stream.subscribers.discard(session)
        if not stream.subscribers:
            del self._streams[name]
            self._schedule(stream).pop(name, None)

    def silence(self, symbol: str) -> int:
        """Stop every stream of `symbol` (a settled contract); subscribers stay, unfed.

        Returns how many streams went quiet.
        """
        quiet = [s for s in self._streams.values() if s.spec.symbol == symbol]
        for stream in quiet:
            self._schedule(stream).pop(stream.spec.name, None)
        return len(quiet)

    def _schedule(self, stream: _Stream) -> dict[str, _Stream]:
        """The table that schedules `stream`'s events."""
        category = stream.spec.category
        if category == streams.PER_TRADE:
            return self._per_trade
        if category == streams.KLINE:
            return self._klines
        period = stream.spec.every_ms
        self._due.setdefault(period, 0)
        return self._timed.setdefault(period, {})

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
        moment = Moment(self._market, now, self._cursor)
        for period in sorted(self._timed):
            if now >= self._due[period]:
                self._due[period] = _next_due(now, period)
                self._publish_timed(self._timed[period], moment)
        if now >= self._next_second:
            self._next_second = (now // 1000 + 1) * 1000
            even_second = (now // 1000) % 2 == 0
            for stream in self._klines.values():
                if even_second or stream.spec.interval == "1s":
                    self._publish_kline(stream, now)

    def _publish_trades(self, first: int, last: int, now: int) -> None:
        trades: dict[int, list[Trade]] = {}  # each symbol's new trades, computed once
        for stream in self._per_trade.values():
            batch = trades.get(stream.index)
            if batch is None:
                batch = trades[stream.index] = [self._market.trade(stream.index, n) for n in range(first, last + 1)]
            for trade in batch:
                event = self._venue.trade_event(stream.spec, stream.index, trade, now)
                if event is not None:
                    self._fan_out(stream, *event)

    def _publish_closed_klines(self, now: int) -> None:
        for stream in self._klines.values():
            if now > stream.close_ms:
                self._publish_kline(stream, now)
                stream.roll_window(now)

    def _publish_timed(self, due: dict[str, _Stream], moment: Moment) -> None:
        book_id = self._market.book_id_at(moment.now)
        for stream in due.values():
            if stream.spec.kind in ("depth", "partialDepth"):
                self._publish_book(stream, book_id, moment.now)
                continue
            for payload, ident in self._venue.timed_events(stream.spec, stream.index, moment):
                self._fan_out(stream, payload, ident)

    def _publish_book(self, stream: _Stream, book_id: int, now: int) -> None:
        if stream.spec.kind == "depth" and book_id <= stream.book_id:
            return  # Binance sends no diff when nothing changed
        payload = self._venue.book_event(stream.spec, stream.index, stream.book_id, book_id, now)
        stream.book_id = book_id
        self._fan_out(stream, payload, self._venue.wire_id(stream.index, book_id))

    def _skip_book_updates(self, now: int) -> None:
        """While paused, updates are lost like trades: the next diff starts after a gap."""
        book_id = self._market.book_id_at(now)
        for due in self._timed.values():
            for stream in due.values():
                stream.book_id = book_id

    def _publish_kline(self, stream: _Stream, now: int) -> None:
        """Publish the kline of the stream's pending window as it stands now."""
        spec = stream.spec
        kline = self._market.kline(stream.index, spec.interval or "", stream.open_ms, now)
        self._fan_out(stream, self._venue.kline_event(spec, stream.index, kline, now), None)

    def _fan_out(self, stream: _Stream, payload: bytes, ident: int | None) -> None:
        if self._muted_until and self._muted_until.get(stream.spec.name, 0) > now_ms():
            return
        symbol, kind = stream.spec.symbol or streams.ALL_SYMBOLS, stream.spec.stat_kind
        for session in stream.subscribers:
            session.deliver(stream.name, payload, symbol, kind, ident)


def _next_due(now: int, period: int) -> int:
    """The next boundary of `period` at least 4/5 of a period after `now`: a tick that
    came late (a starved process) must not make the next event follow within a few
    milliseconds, since each of Binance's `@1000ms` events spans about a second of
    updates (a 1 s diff covering fewer than 20 ids, about 30 a second, failed
    tests/test_fake_books.py once in a clean-clone run of the suite)."""
    boundary = (now // period + 1) * period
    return boundary if boundary - now >= period * 4 // 5 else boundary + period


def _streamset_key(session: Subscriber) -> str:
    return "/".join(sorted(session.stream_names()))
