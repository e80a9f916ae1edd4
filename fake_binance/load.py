"""The market-load mode's publisher: the whole market's four busiest stream kinds at a
total rate, cheaply enough that the recorder under test keeps most of the machine.

`LoadHub` is the spot hub with one difference: the streams of `listing.KINDS` (trade,
aggTrade, bookTicker, depth@100ms) of listed symbols are fed from a `listing.LoadPlan`
(a Zipf-skewed rate per symbol) instead of from the market clock. Every other stream
(klines, tickers, slower depth ...) is the ordinary hub's.

Cost per message is what decides whether the figures measure the recorder or the fake:
- a trade, aggTrade or bookTicker frame is pre-encoded per symbol (a few variants of
  price and quantity taken from the model) and only its ids and times are filled in
  (one bytes %-format per frame);
- a connection's frames of one tick go to its transport as one write of ready-made
  websocket frames (`wire.frame_header`, the machinery of the benchmark's blast
  server), not one aiohttp `send_frame` each;
- a stream's schedule is computed once per rate (`Schedule`): each 10 ms tick walks
  the list of streams due in it, nothing else.

Ledger: every trade and aggTrade id written is counted in the `sent` stats per symbol
as a range (first, last, count), a tick's events of a stream at once, so that a
client's stored ids can be checked for missing and duplicate ones. Per symbol, ids
are consecutive from where the market clock stands at start-up; bookTicker's `u` is a
per-symbol sequence of its own.

Depth: diffs come from the model (`orderbook.OrderBook`, as the ordinary hub sends
them) at the symbol's planned pace, so `U` = previous `u` + 1 on every stream and the
REST snapshots (`GET /api/v3/depth`, the same model) agree with them. A diff covers
the book updates since the stream's previous one, however long ago; a symbol's book
changes at the model's `--trades-per-second` (3 updates per model trade), so that
option sets how much a thin symbol's diffs carry. These are computed per event, not
pre-encoded: their content has to match the snapshots.
"""

from __future__ import annotations

import random
from typing import Protocol, cast

from fake_binance import streams
from fake_binance.hub import Hub, Subscriber, now_ms
from fake_binance.listing import KINDS, LoadPlan
from fake_binance.market import Market
from fake_binance.orderbook import UPDATES_PER_TRADE
from fake_binance.stats import Stats
from fake_binance.streams import StreamSpec, Venue
from worker.replay.wire import frame_header

TICK_MS = 10
CYCLE_TICKS = 1000
"""The schedule repeats every 10 s: a stream's rate is rounded to a tenth of a message a
second (at least one message per cycle)."""
DEPTH_KIND = "depth@100ms"
_DEPTH_SLOT_TICKS = 10  # depth@100ms: at most one diff per 100 ms
_VARIANTS = 8
_MAX_CATCH_UP_TICKS = CYCLE_TICKS


class WireSubscriber(Subscriber, Protocol):
    """A session that also takes ready-made websocket frames (`ws.Session`)."""

    combined: bool

    def write_wire(self, data: bytes) -> None: ...


class Schedule:
    """Which streams send how many messages in each tick of a CYCLE_TICKS cycle.

    Stream `slot` = symbol rank * len(KINDS) + kind number. A stream's messages of a
    cycle are spread evenly over it from a random (seeded) phase, so quiet streams do
    not all fire in the same tick.
    """

    def __init__(self, plan: LoadPlan, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.ticks: list[list[tuple[int, int]]] = [[] for _ in range(CYCLE_TICKS)]
        cycle_seconds = CYCLE_TICKS * TICK_MS / 1000
        for kind_number, kind in enumerate(KINDS):
            step = _DEPTH_SLOT_TICKS if kind == DEPTH_KIND else 1
            slots = CYCLE_TICKS // step
            for rank, rate in enumerate(plan.rates[kind]):
                per_cycle = max(1, round(rate * cycle_seconds))
                counts: dict[int, int] = {}
                phase = rng.randrange(slots)
                for j in range(per_cycle):
                    tick = (phase + j * slots // per_cycle) % slots * step
                    counts[tick] = counts.get(tick, 0) + 1
                slot = rank * len(KINDS) + kind_number
                for tick, count in counts.items():
                    self.ticks[tick].append((slot, count))
        self.messages_per_second = sum(count for tick in self.ticks for _, count in tick) / cycle_seconds


class _LoadStream:
    """One subscribed load stream: its subscribers, next id, and pre-encoded frames."""

    __slots__ = ("spec", "index", "kind", "subscribers", "next_id", "book_id", "formats", "trade_offset")

    def __init__(self, spec: StreamSpec, index: int, kind: str, next_id: int, book_id: int) -> None:
        self.spec = spec
        self.index = index
        self.kind = kind
        self.subscribers: set[WireSubscriber] = set()
        self.next_id = next_id
        self.book_id = book_id
        # (combined, raw) %-formats per variant (`_templates`).
        self.formats: list[tuple[bytes, bytes]] = []
        self.trade_offset = 0  # aggTrade: its trade id (f = l) is the aggregate id + this


class LoadHub(Hub):
    """The spot hub, with the load kinds' streams fed from a plan (see the module)."""

    def __init__(self, market: Market, venue: Venue, stats: Stats, plan: LoadPlan) -> None:
        super().__init__(market, venue, stats)
        self.plan = plan
        self.schedule = Schedule(plan)
        self._load: dict[int, _LoadStream] = {}
        self._slot_of: dict[str, int] = {}
        # Where a stream nobody holds any more stopped: a client that reconnects gets the
        # next ids, never ones it stored already (the load runs ahead of the model clock).
        self._next_ids: dict[int, int] = {}
        self._last_tick: int | None = None

    def set_plan(self, plan: LoadPlan) -> None:
        """A new total rate (or skew) from the next tick on; ids go on where they were."""
        self.plan = plan
        self.schedule = Schedule(plan)

    # -- registry -----------------------------------------------------------------------

    def attach(self, session: Subscriber, spec: StreamSpec) -> None:
        slot = self._slot(spec)
        if slot is None:
            super().attach(session, spec)
            return
        stream = self._load.get(slot)
        if stream is None:
            stream = self._new_stream(spec, slot)
            self._load[slot] = stream
            self._slot_of[spec.name] = slot
        stream.subscribers.add(cast(WireSubscriber, session))  # every session is a ws.Session

    def detach(self, session: Subscriber, name: str) -> None:
        slot = self._slot_of.get(name)
        if slot is None:
            super().detach(session, name)
            return
        stream = self._load[slot]
        stream.subscribers.discard(session)
        if not stream.subscribers:
            del self._load[slot], self._slot_of[name]
            self._next_ids[slot] = stream.next_id

    def _slot(self, spec: StreamSpec) -> int | None:
        """The stream's schedule slot, or None if the plan does not feed it."""
        if spec.symbol is None or spec.silent:
            return None
        kind = spec.name.partition("@")[2]
        if kind not in KINDS:
            return None
        return self._market.index(spec.symbol) * len(KINDS) + KINDS.index(kind)

    def _new_stream(self, spec: StreamSpec, slot: int) -> _LoadStream:
        market, index, kind = self._market, slot // len(KINDS), KINDS[slot % len(KINDS)]
        now = now_ms()
        n = max(market.last_n(now), 0) + 1
        first = {
            "trade": market.trade_id_base(index) + n,
            "aggTrade": market.agg_id_base(index) + n,
            "bookTicker": UPDATES_PER_TRADE * n,
        }.get(kind, 0)
        stream = _LoadStream(spec, index, kind, self._next_ids.get(slot, first), market.book_id_at(now))
        if kind != DEPTH_KIND:
            stream.formats = _templates(market, spec, index, kind, n)
        stream.trade_offset = market.trade_id_base(index) - market.agg_id_base(index)
        return stream

    # -- publishing -------------------------------------------------------------------

    def tick(self, now: int) -> None:
        super().tick(now)
        current = now // TICK_MS
        first = current if self._last_tick is None else max(self._last_tick + 1, current - _MAX_CATCH_UP_TICKS)
        self._last_tick = current
        if not self._load or now < self._paused_until:
            return  # paused (`pause_data`): the ticks pass unsent, ids resume where they were
        out: dict[WireSubscriber, list[bytes]] = {}
        for tick in range(first, current + 1):
            for slot, count in self.schedule.ticks[tick % CYCLE_TICKS]:
                stream = self._load.get(slot)
                if stream is not None:
                    self._emit(stream, count, now, out)
        for session, parts in out.items():
            session.write_wire(b"".join(parts))

    def _emit(self, stream: _LoadStream, count: int, now: int, out: dict[WireSubscriber, list[bytes]]) -> None:
        if stream.kind == DEPTH_KIND:
            self._emit_depth(stream, now, out)
            return
        first = stream.next_id
        stream.next_id += count
        wires: dict[bool, bytes] = {}
        for session in stream.subscribers:
            wire = wires.get(session.combined)
            if wire is None:
                wire = wires[session.combined] = self._wire(stream, first, count, now, session.combined)
            out.setdefault(session, []).append(wire)
            counted = None if stream.kind == "bookTicker" else (first, first + count - 1)
            self._stats.record_sent_range(stream.spec.symbol or "", stream.kind, counted, count)

    @staticmethod
    def _wire(stream: _LoadStream, first: int, count: int, now: int, combined: bool) -> bytes:
        """Frames for ids first..first+count-1, header and payload, ready for the wire."""
        variant = 0 if combined else 1
        formats = stream.formats
        parts: list[bytes] = []
        for ident in range(first, first + count):
            fmt = formats[ident % _VARIANTS][variant]
            if stream.kind == "trade":
                frame = fmt % (now, ident, now)
            elif stream.kind == "aggTrade":
                trade_id = ident + stream.trade_offset
                frame = fmt % (now, ident, trade_id, trade_id, now)
            else:
                frame = fmt % ident
            parts.append(frame_header(len(frame)))
            parts.append(frame)
        return b"".join(parts)

    def _emit_depth(self, stream: _LoadStream, now: int, out: dict[WireSubscriber, list[bytes]]) -> None:
        book_id = self._market.book_id_at(now)
        if book_id <= stream.book_id:
            return  # Binance sends no diff when nothing changed
        payload = self._venue.book_event(stream.spec, stream.index, stream.book_id, book_id, now)
        stream.book_id = book_id
        name = stream.spec.name.encode()
        for session in stream.subscribers:
            frame = streams.combined_frame(name, payload) if session.combined else payload
            out.setdefault(session, []).extend((frame_header(len(frame)), frame))
            self._stats.record_sent_range(stream.spec.symbol or "", stream.kind, (book_id, book_id), 1)


# Stand-ins for the fields filled per frame, found in the encoded payload and turned
# into %d: their order in the payload is the order of the format's arguments.
_EVENT_TIME, _ID, _FIRST_TRADE, _LAST_TRADE, _TRADE_TIME = (-9_000_000_001 - k for k in range(5))


def _templates(market: Market, spec: StreamSpec, index: int, kind: str, n: int) -> list[tuple[bytes, bytes]]:
    """Per variant (a trade of the model), the (combined, raw) %-format of the frame:
    trade takes (E, t, T), aggTrade (E, a, f, l, T), bookTicker (u)."""
    symbol = spec.symbol or ""
    formats = []
    for variant in range(_VARIANTS):
        trade = market.trade(index, n + variant)
        if kind == "trade":
            event = streams.trade(symbol, trade, _EVENT_TIME) | {"t": _ID, "T": _TRADE_TIME}
        elif kind == "aggTrade":
            event = streams.agg_trade(symbol, trade, _EVENT_TIME)
            event |= {"a": _ID, "f": _FIRST_TRADE, "l": _LAST_TRADE, "T": _TRADE_TIME}
        else:
            event = streams.book_ticker(symbol, market.book(index, trade)) | {"u": _ID}
        payload = streams.encode(event).replace(b"%", b"%%")
        for stand_in in (_EVENT_TIME, _ID, _FIRST_TRADE, _LAST_TRADE, _TRADE_TIME):
            payload = payload.replace(str(stand_in).encode(), b"%d")
        formats.append((streams.combined_frame(spec.name.encode(), payload), payload))
    return formats
