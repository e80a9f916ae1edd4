"""Stream names and the JSON payloads of their events, field for field as Binance's,
and the `Venue`: what one market of the fake decides (its stream names, payloads and
update ids), asked by the shared layers (hub, sessions, REST). `SpotVenue` is spot's;
`futures.FuturesVenue` builds the futures payloads from the same pieces.

Spot's kinds: trade, aggTrade, bookTicker, blockTrade, kline_<i>, ticker,
ticker_<1h|4h|1d>, miniTicker, avgPrice, referencePrice, depth[@100ms],
depth<5|10|20>[@100ms], and the all-market arrays !miniTicker@arr and
!ticker_<1h|4h|1d>@arr (every listed symbol, whether asked for or not).

Payloads are encoded once with orjson and shared by every connection that carries
the stream; a combined-stream frame is built by byte concatenation around the
already-encoded payload instead of re-encoding a wrapper object.
"""

from __future__ import annotations

import re
from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from fake_binance import intervals
from fake_binance.market import BlockTrade, Book, Kline, Market, Trade, WindowStats
from fake_binance.market import decimal_str as _d
from fake_binance.orderbook import BookDiff, BookView

# Kinds driven by each trade as it happens; the rest are emitted on a timer.
TRADE_KINDS = frozenset({"trade", "aggTrade", "bookTicker", "blockTrade"})
PER_SECOND_KINDS = frozenset({"ticker", "miniTicker", "avgPrice", "referencePrice"})
TICKER_WINDOWS: dict[str, int] = {"1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}
# All-market streams: name -> (kind, ticker window).
ALL_MARKET: dict[str, tuple[str, str | None]] = {
    "!miniTicker@arr": ("miniTicker@arr", None),
    **{f"!ticker_{w}@arr": ("windowTicker@arr", w) for w in TICKER_WINDOWS},
}
SHUTDOWN_STREAM = b"!serverShutdown"
ALL_SYMBOLS = "ALL"  # the `sent` stats key of all-market streams
DAY_MS = 86_400_000
SPOT_STATUSES = ("TRADING", "HALT", "BREAK")
DELISTED = "DELISTED"
"""What `set_status` takes besides SPOT_STATUSES: the symbol leaves exchangeInfo."""
AVG_PRICE_MS = 300_000
SECOND_MS = 1000
# How the hub schedules a stream (StreamSpec.category).
PER_TRADE = "trade"  # an event per trade, as it happens
KLINE = "kline"  # the open kline every 2 s, and each window's final kline when it closes
TIMED = "timed"  # an event every `every_ms`, on multiples of it

SYMBOL_PART = re.compile(r"[A-Za-z0-9._-]{1,40}")
_DEPTH_KIND = re.compile(r"depth(5|10|20)?(@100ms)?")


class InvalidStream(ValueError):
    """A stream name whose kind Binance does not know (the handshake gets HTTP 400)."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A parsed stream name. `symbol` is None when no listed symbol matches.

    `interval` is a kline interval or a ticker window (1h, 4h, 1d); `levels` is the
    N of a partial depth stream (0 for a diff-depth stream); `every_ms` the period
    of a timed stream (a depth stream's 100 or 1000 ms, a ticker's second). `silent`
    marks a stream the server acknowledges but never feeds (asked on a path that
    does not carry it).
    """

    name: str
    symbol: str | None
    kind: str
    interval: str | None = None
    levels: int = 0
    every_ms: int = 0
    category: str = PER_TRADE
    silent: bool = False

    @property
    def all_market(self) -> bool:
        return self.name.startswith("!")

    @property
    def deliverable(self) -> bool:
        return not self.silent and (self.symbol is not None or self.all_market)

    @property
    def stat_kind(self) -> str:
        """Key of the stream's kind in the `sent` stats (kline_1m, depth@100ms, ...)."""
        if self.all_market:
            return self.name.removeprefix("!")
        return self.name.partition("@")[2]


def split_stream(name: str) -> tuple[str, str]:
    """`<symbol>@<kind>` -> (symbol part, kind); InvalidStream if it is not that shape."""
    part, sep, kind = name.partition("@")
    if not sep or not SYMBOL_PART.fullmatch(part):
        raise InvalidStream(f"invalid stream name {name!r}")
    return part, kind


def listed_symbol(part: str, listed: Set[str]) -> str | None:
    """The listed symbol a lowercase stream name part names, else None (a silent stream).

    Symbols must be lowercase, as on Binance: `BTCUSDT@trade` parses but, like a
    delisted symbol, never delivers anything.
    """
    return part.upper() if part.islower() and part.upper() in listed else None


def parse_stream(name: str, listed: Set[str]) -> StreamSpec:
    """Parse a spot stream name; an unlisted symbol is fine, an unknown kind is not."""
    if name in ALL_MARKET:
        kind, window = ALL_MARKET[name]
        return StreamSpec(name, None, kind, window, every_ms=SECOND_MS, category=TIMED)
    part, kind = split_stream(name)
    symbol = listed_symbol(part, listed)
    if kind in TRADE_KINDS:
        return StreamSpec(name, symbol, kind)
    if kind in PER_SECOND_KINDS:
        return StreamSpec(name, symbol, kind, every_ms=SECOND_MS, category=TIMED)
    depth = _DEPTH_KIND.fullmatch(kind)
    if depth:
        levels, fast = depth.groups()
        return depth_spec(name, symbol, levels, 100 if fast else SECOND_MS)
    prefix, _, interval = kind.partition("_")
    if prefix == "kline" and interval in intervals.INTERVALS:
        return StreamSpec(name, symbol, "kline", interval, category=KLINE)
    if prefix == "ticker" and interval in TICKER_WINDOWS:
        return StreamSpec(name, symbol, "windowTicker", interval, every_ms=SECOND_MS, category=TIMED)
    raise InvalidStream(f"invalid stream name {name!r}")


def depth_spec(name: str, symbol: str | None, levels: str | None, every_ms: int) -> StreamSpec:
    """A diff-depth (`depth`) or partial-depth (`partialDepth`, top `levels`) stream."""
    if levels:
        return StreamSpec(name, symbol, "partialDepth", levels=int(levels), every_ms=every_ms, category=TIMED)
    return StreamSpec(name, symbol, "depth", every_ms=every_ms, category=TIMED)


def combined_frame(stream: bytes, payload: bytes) -> bytes:
    """`{"stream":..,"data":..}` around an encoded payload (names need no escaping)."""
    return b'{"stream":"' + stream + b'","data":' + payload + b"}"


def trade(symbol: str, t: Trade | BlockTrade, now_ms: int) -> dict[str, Any]:
    return {
        "e": "trade",
        "E": now_ms,
        "s": symbol,
        "t": t.id,
        "p": _d(t.price),
        "q": _d(t.qty),
        "T": t.time,
        "m": t.buyer_is_maker,
        "M": True,
    }


def agg_trade(symbol: str, t: Trade, now_ms: int) -> dict[str, Any]:
    return {
        "e": "aggTrade",
        "E": now_ms,
        "s": symbol,
        "a": t.agg_id,
        "p": _d(t.price),
        "q": _d(t.qty),
        "f": t.id,
        "l": t.id,
        "T": t.time,
        "m": t.buyer_is_maker,
        "M": True,
    }


def trade_event(symbol: str, t: Trade, now_ms: int) -> bytes:
    return encode(trade(symbol, t, now_ms))


def agg_trade_event(symbol: str, t: Trade, now_ms: int) -> bytes:
    return encode(agg_trade(symbol, t, now_ms))


def book_ticker(symbol: str, b: Book) -> dict[str, Any]:
    return {"u": b.update_id, "s": symbol, "b": b.bid, "B": b.bid_qty, "a": b.ask, "A": b.ask_qty}


def block_trade_event(symbol: str, t: BlockTrade, now_ms: int) -> bytes:
    """A trade's fields without `M`, under the block trade's own id."""
    event = trade(symbol, t, now_ms)
    del event["M"]
    return encode({**event, "e": "blockTrade"})


def depth_update(symbol: str, d: BookDiff, now_ms: int) -> dict[str, Any]:
    """A diff-depth event: absolute quantities, "0" removes a level, U..u its ids."""
    return {"e": "depthUpdate", "E": now_ms, "s": symbol, "U": d.first, "u": d.last, "b": d.bids, "a": d.asks}


def book_levels(view: BookView) -> dict[str, object]:
    """`{lastUpdateId, bids, asks}`: a partial depth event and the REST snapshot alike."""
    return {"lastUpdateId": view.update_id, "bids": view.bids, "asks": view.asks}


def reference_price_event(symbol: str, price: float | None, now_ms: int) -> bytes:
    reference = None if price is None else _d(price)
    return orjson.dumps({"e": "referencePrice", "s": symbol, "r": reference, "t": now_ms})


def kline(event: str, symbol: str, interval: str, k: Kline, now_ms: int) -> dict[str, Any]:
    """A kline event (`e` "kline", or a futures price kline's type) of trade statistics."""
    s = k.stats
    return {
        "e": event,
        "E": now_ms,
        "s": symbol,
        "k": {
            "t": k.open_ms,
            "T": k.close_ms,
            "s": symbol,
            "i": interval,
            "f": s.first_id,
            "L": s.last_id,
            "o": _d(s.open),
            "c": _d(s.close),
            "h": _d(s.high),
            "l": _d(s.low),
            "v": _d(s.volume),
            "n": s.count,
            "x": k.closed,
            "q": _d(s.quote_volume),
            "V": _d(s.taker_buy_volume),
            "Q": _d(s.taker_buy_quote_volume),
            "B": "0",
        },
    }


def mini_ticker(symbol: str, s: WindowStats, now_ms: int) -> dict[str, Any]:
    """The 24hrMiniTicker object (alone, or one element of !miniTicker@arr)."""
    return {
        "e": "24hrMiniTicker",
        "E": now_ms,
        "s": symbol,
        "c": _d(s.close),
        "o": _d(s.open),
        "h": _d(s.high),
        "l": _d(s.low),
        "v": _d(s.volume),
        "q": _d(s.quote_volume),
    }


def _price_change(s: WindowStats) -> dict[str, object]:
    """The p and P fields every ticker starts with."""
    change = s.close - s.open
    return {"p": _d(change), "P": f"{100.0 * change / s.open:.3f}"}


def _window_counts(s: WindowStats, open_ms: int, close_ms: int) -> dict[str, object]:
    """The O C F L n fields every ticker ends with."""
    return {"O": open_ms, "C": close_ms, "F": s.first_id, "L": s.last_id, "n": s.count}


def ticker(symbol: str, s: WindowStats, b: Book | None, now_ms: int) -> dict[str, Any]:
    """The 24hrTicker; without a book (futures) it has no previous close nor best bid/ask."""
    previous_close = {} if b is None else {"x": _d(s.prev_close)}
    best = {} if b is None else {"b": b.bid, "B": b.bid_qty, "a": b.ask, "A": b.ask_qty}
    return {
        "e": "24hrTicker",
        "E": now_ms,
        "s": symbol,
        **_price_change(s),
        "w": _d(weighted_average(s)),
        **previous_close,
        "c": _d(s.close),
        "Q": _d(s.last_qty),
        **best,
        "o": _d(s.open),
        "h": _d(s.high),
        "l": _d(s.low),
        "v": _d(s.volume),
        "q": _d(s.quote_volume),
        **_window_counts(s, now_ms - DAY_MS, now_ms),
    }


def window_ticker(symbol: str, window: str, s: WindowStats, now_ms: int) -> dict[str, object]:
    """The rolling-window ticker (1hTicker ...), alone or one element of its @arr."""
    return {
        "e": f"{window}Ticker",
        "E": now_ms,
        "s": symbol,
        **_price_change(s),
        "o": _d(s.open),
        "h": _d(s.high),
        "l": _d(s.low),
        "c": _d(s.close),
        "w": _d(weighted_average(s)),
        "v": _d(s.volume),
        "q": _d(s.quote_volume),
        **_window_counts(s, now_ms - TICKER_WINDOWS[window], now_ms),
    }


def encode(payload: object) -> bytes:
    return orjson.dumps(payload)


def avg_price_event(symbol: str, s: WindowStats, now_ms: int) -> bytes:
    return orjson.dumps(
        {
            "e": "avgPrice",
            "E": now_ms,
            "s": symbol,
            "i": "5m",
            "w": _d(weighted_average(s)),
            "T": s.last_time,
        }
    )


def shutdown_event(now_ms: int) -> bytes:
    return orjson.dumps({"e": "serverShutdown", "E": now_ms})


def weighted_average(s: WindowStats) -> float:
    return s.quote_volume / s.volume if s.volume else s.close


# -- markets ------------------------------------------------------------------------

Event = tuple[bytes, int | None]
"""An encoded payload and its id for the `sent` stats (trade id, update id; None)."""


class Moment:
    """The market as one publishing tick sees it: window statistics computed once per
    symbol and window length, however many streams ask."""

    def __init__(self, market: Market, now: int, last_n: int) -> None:
        self.market = market
        self.now = now
        self.last_n = last_n
        self._windows: dict[tuple[int, int], WindowStats] = {}

    def stats(self, index: int, length_ms: int) -> WindowStats:
        """Statistics of symbol `index`'s trades in the `length_ms` ending now."""
        key = (index, length_ms)
        if key not in self._windows:
            self._windows[key] = self.market.window(index, self.now - length_ms, self.now)
        return self._windows[key]

    def last_trade(self, index: int) -> Trade:
        return self.market.trade(index, max(self.last_n, 0))


class Venue(Protocol):
    """What one market of the fake (spot, USDⓈ-M, COIN-M) decides: its stream names, its
    payloads and its update ids. The hub, the sessions and the REST layer are shared;
    they ask the venue whatever differs between markets."""

    name: str

    @property
    def listed(self) -> Set[str]:
        """Symbols whose streams deliver (a settled futures contract leaves this set)."""

    def parse_stream(self, name: str, route: str) -> StreamSpec:
        """The spec of a stream asked for on websocket path `route` ("" when unrouted)."""

    def knows(self, symbol: str, now: int) -> bool:
        """Whether REST and exchangeInfo list `symbol`."""

    def symbols(self, now: int) -> list[str]:
        """The symbols exchangeInfo lists now, in the market's order."""

    def trade_event(self, spec: StreamSpec, index: int, t: Trade, now: int) -> Event | None:
        """The event a per-trade stream sends for trade `t`, if any."""

    def kline_event(self, spec: StreamSpec, index: int, k: Kline, now: int) -> bytes: ...

    def timed_events(self, spec: StreamSpec, index: int, moment: Moment) -> list[Event]:
        """What a timed stream (not a depth stream) sends at `moment`."""

    def book_event(self, spec: StreamSpec, index: int, previous: int, book_id: int, now: int) -> bytes:
        """A depth event: the diff (or the top levels) after the stream's `previous` event."""

    def wire_id(self, index: int, update_id: int) -> int:
        """The update id clients see for the model's book `update_id` of symbol `index`."""

    def model_id(self, index: int, wire_id: int) -> int:
        """The model's book update id in effect at a client-visible update id."""


class SpotVenue:
    """Binance spot (the fake's root paths: /ws, /stream, /api/v3)."""

    name = "spot"

    def __init__(self, market: Market, halted: frozenset[str], unlisted: frozenset[str] = frozenset()) -> None:
        self._market = market
        # exchangeInfo's status of each listed symbol; the model's symbols in `unlisted`
        # trade but are not listed until `set_status` lists them (a listing mid-run).
        self._statuses = {s: ("HALT" if s in halted else "TRADING") for s in market.symbols if s not in unlisted}
        self.listed: Set[str] = frozenset(self._statuses)

    def parse_stream(self, name: str, route: str) -> StreamSpec:
        return parse_stream(name, self.listed)

    def knows(self, symbol: str, now: int) -> bool:
        return symbol in self.listed

    def symbols(self, now: int) -> list[str]:
        return [symbol for symbol in self._market.symbols if symbol in self._statuses]

    def status(self, symbol: str) -> str:
        """exchangeInfo's status of a listed symbol: TRADING, HALT or BREAK."""
        return self._statuses[symbol]

    def set_status(self, symbol: str, status: str) -> None:
        """List a symbol of the model, change a listed one's status, or (DELISTED) take it
        out of exchangeInfo; streams asked for later follow (a delisted symbol's are silent)."""
        self._market.index(symbol)  # UnknownSymbol for a symbol the model does not trade
        if status == DELISTED:
            self._statuses.pop(symbol, None)
        else:
            self._statuses[symbol] = status
        self.listed = frozenset(self._statuses)

    def trade_event(self, spec: StreamSpec, index: int, t: Trade, now: int) -> Event | None:
        symbol = spec.symbol or ""
        if spec.kind == "trade":
            return trade_event(symbol, t, now), t.id
        if spec.kind == "aggTrade":
            return agg_trade_event(symbol, t, now), t.agg_id
        if spec.kind == "bookTicker":
            return encode(book_ticker(symbol, self._market.book(index, t))), None
        block = self._market.block_trade(index, t.id - self._market.trade_id_base(index))
        return None if block is None else (block_trade_event(symbol, block, now), block.id)

    def kline_event(self, spec: StreamSpec, index: int, k: Kline, now: int) -> bytes:
        return encode(kline("kline", spec.symbol or "", spec.interval or "", k, now))

    def timed_events(self, spec: StreamSpec, index: int, moment: Moment) -> list[Event]:
        return [(self._timed_payload(spec, index, moment), None)]

    def _timed_payload(self, spec: StreamSpec, index: int, moment: Moment) -> bytes:
        symbol, kind, now = spec.symbol or "", spec.kind, moment.now
        if kind == "miniTicker@arr":
            return encode([mini_ticker(s, moment.stats(i, DAY_MS), now) for i, s in enumerate(self._market.symbols)])
        if kind == "windowTicker@arr" and spec.interval:
            length = TICKER_WINDOWS[spec.interval]
            symbols = enumerate(self._market.symbols)
            return encode([window_ticker(s, spec.interval, moment.stats(i, length), now) for i, s in symbols])
        if kind == "avgPrice":
            return avg_price_event(symbol, moment.stats(index, AVG_PRICE_MS), now)
        if kind == "referencePrice":
            # The book's mid; None (JSON null) for halted symbols, which have none.
            price = (
                None if self._statuses.get(symbol) == "HALT" else self._market.mid_price(index, max(moment.last_n, 0))
            )
            return reference_price_event(symbol, price, now)
        if kind == "windowTicker" and spec.interval:
            length = TICKER_WINDOWS[spec.interval]
            return encode(window_ticker(symbol, spec.interval, moment.stats(index, length), now))
        if kind == "miniTicker":
            return encode(mini_ticker(symbol, moment.stats(index, DAY_MS), now))
        book = self._market.book(index, moment.last_trade(index))
        return encode(ticker(symbol, moment.stats(index, DAY_MS), book, now))

    def book_event(self, spec: StreamSpec, index: int, previous: int, book_id: int, now: int) -> bytes:
        if spec.kind == "partialDepth":
            return encode(book_levels(self._market.book_view(index, book_id, spec.levels)))
        diff = self._market.order_book(index).diff(previous + 1, book_id)
        return encode(depth_update(spec.symbol or "", diff, now))

    def wire_id(self, index: int, update_id: int) -> int:
        return update_id

    def model_id(self, index: int, wire_id: int) -> int:
        return wire_id
