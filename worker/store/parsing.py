"""Raw websocket frames, as buffered in Redis, turned into row tuples for `storage`.

The websocket task stores frames exactly as Binance sent them so that the network
path does no work; all parsing and validation happens here, in the drain, a batch at
a time. A frame that cannot be stored becomes a dead letter with a reason instead of
an exception, so one bad frame never holds up the frames around it.

The per-frame path is the drain's hot loop: one `orjson.loads`, one dict lookup from
the stream's name to its row builder, one tuple per row, and no logging.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from worker.buffer import CLOCK_MARK_PREFIX, parse_clock_mark
from worker.store.depth import BadLevels, pack_levels
from worker.streams import MARKETS, SPOT, Market, market_named, market_of_st, stream_kind

Payload = dict[str, Any]
Row = tuple[Any, ...]
RowBuilder = Callable[[Payload, int | None, int | None], Row]
"""(payload, received_at, received_seq) -> the row, those two last."""

CONTROL = "control"
"""Pseudo kind of protocol messages that are not market data."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A frame that could not be stored, kept as received so it can be replayed."""

    frame: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    """The rows of a batch by table (every table of the list's market present, maybe empty), and the rest."""

    rows: dict[str, list[Row]]
    dead_letters: list[DeadLetter]
    control: int  # protocol messages (serverShutdown, request answers): not data, not errors
    frames: int  # elements that were not clock marks
    last_mark: int | None  # the receive time in effect at the batch's end, for what follows it
    next_seq: int  # the place in its flush of the frame that follows the batch (see `buffer.clock_mark`)


class _FrameError(Exception):
    """A frame that cannot become rows; the message is the dead letter's reason."""


class _BadField(Exception):
    """A field with the wrong type; the parse loop adds the stream kind to the message."""


# Field readers. Each checks the type, because SQLite would otherwise store a string
# in an integer column without complaint (a bad id or time would poison gap detection
# and retention), and PostgreSQL would reject the whole batch. A missing field raises
# KeyError, named by the parse loop. A call per field costs about 0.3 us per trade
# frame over unchecked indexing, so the kinds that carry the volume (one frame per
# trade) have a fast builder as well: see `_fast_trade_row`.


def _text(payload: Payload, name: str) -> str:
    value = payload[name]
    if type(value) is not str:
        raise _BadField(f"field {name!r} = {value!r}, expected a string")
    return value


def _int(payload: Payload, name: str) -> int:
    value = payload[name]
    if type(value) is not int:
        raise _BadField(f"field {name!r} = {value!r}, expected an integer")
    return value


def _price(payload: Payload, name: str) -> float:
    """Binance's decimal strings; float64 holds their up to 15 significant digits."""
    value = payload[name]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _BadField(f"field {name!r} = {value!r}, expected a decimal string") from None


def _flag(payload: Payload, name: str) -> bool:
    value = payload[name]
    if type(value) is not bool:
        raise _BadField(f"field {name!r} = {value!r}, expected true or false")
    return value


def _object(payload: Payload, name: str) -> Payload:
    value = payload[name]
    if type(value) is not dict:
        raise _BadField(f"field {name!r} = {value!r}, expected an object")
    return value


def _optional_price(payload: Payload, name: str) -> float | None:
    """A decimal field Binance may leave out (older payloads) or send as "" (a COIN-M
    delivery contract's funding rate): None then."""
    value = payload.get(name)
    return None if value is None or value == "" else _price(payload, name)


def _optional_text(payload: Payload, name: str) -> str | None:
    return None if payload.get(name) is None else _text(payload, name)


# Field readers beyond the plain types above.


def _levels(payload: Payload, name: str) -> bytes:
    try:
        return pack_levels(payload[name])
    except BadLevels as error:
        raise _BadField(f"field {name!r}: {error}") from None


def _price_or_null(payload: Payload, name: str) -> float | None:
    return None if payload[name] is None else _price(payload, name)


def _window(payload: Payload, name: str) -> str:
    return _text(payload, name).removesuffix("Ticker")  # "1hTicker" -> "1h"


# The payload fields of every stream kind, in the column order of its table. The
# checked row builders are made from this table; the replay reads it backwards.


class FieldType(enum.Enum):
    """How a payload field becomes a column value; the replay turns each back."""

    TEXT = "a string"
    INT = "an integer"  # ids, counts and times (ms)
    DECIMAL = "a decimal string"  # prices and quantities, stored as float64
    DECIMAL_OR_NULL = "a decimal string or null"  # referencePrice's r: null when there is none
    FLAG = "true or false"
    LEVELS = "[price, quantity] pairs"  # stored packed, see worker/store/depth.py
    WINDOW = "a window ticker's event type"  # "1hTicker", stored as its window "1h"


class Field(NamedTuple):
    """A payload field that fills a column: `path` is ("p",), or ("k", "o") for field o
    of the payload's object k (a kline's fields)."""

    path: tuple[str, ...]
    type: FieldType


def _fields(names: str, field_type: FieldType) -> tuple[Field, ...]:
    """Fields of one type, by Binance's letters; "k.o" names field o of object k."""
    return tuple(Field(tuple(name.split(".")), field_type) for name in names.split())


_TEXT, _INT, _DECIMAL, _FLAG = FieldType.TEXT, FieldType.INT, FieldType.DECIMAL, FieldType.FLAG
_TICKER_COUNTS = _fields("O C F L n", _INT)

FIELDS: dict[str, tuple[Field, ...]] = {
    "trade": (*_fields("s", _TEXT), *_fields("t", _INT), *_fields("p q", _DECIMAL), *_fields("T", _INT),
              *_fields("m", _FLAG), *_fields("E", _INT)),
    "aggTrade": (*_fields("s", _TEXT), *_fields("a", _INT), *_fields("p q", _DECIMAL), *_fields("f l T", _INT),
                 *_fields("m", _FLAG), *_fields("E", _INT)),
    "kline": (*_fields("s k.i", _TEXT), *_fields("k.t k.T", _INT), *_fields("k.o k.h k.l k.c k.v k.q", _DECIMAL),
              *_fields("k.n", _INT), *_fields("k.V k.Q", _DECIMAL), *_fields("k.f k.L", _INT),
              *_fields("k.x", _FLAG), *_fields("E", _INT)),
    "ticker": (*_fields("s", _TEXT), *_fields("E", _INT), *_fields("p P w x c Q b B a A o h l v q", _DECIMAL),
               *_TICKER_COUNTS),
    "miniTicker": (*_fields("s", _TEXT), *_fields("E", _INT), *_fields("c o h l v q", _DECIMAL)),
    "bookTicker": (*_fields("s", _TEXT), *_fields("u", _INT), *_fields("b B a A", _DECIMAL)),
    "avgPrice": (*_fields("s", _TEXT), *_fields("E", _INT), *_fields("i", _TEXT), *_fields("w", _DECIMAL),
                 *_fields("T", _INT)),
    "depth": (*_fields("s", _TEXT), *_fields("u U E", _INT), *_fields("b a", FieldType.LEVELS)),
    "depth5": (*_fields("lastUpdateId", _INT), *_fields("bids asks", FieldType.LEVELS)),
    "ticker_1h": (*_fields("s", _TEXT), *_fields("e", FieldType.WINDOW), *_fields("E", _INT),
                  *_fields("p P o h l c w v q", _DECIMAL), *_TICKER_COUNTS),
    "blockTrade": (*_fields("s", _TEXT), *_fields("t", _INT), *_fields("p q", _DECIMAL), *_fields("T", _INT),
                   *_fields("m", _FLAG), *_fields("E", _INT)),
    "referencePrice": (*_fields("s", _TEXT), *_fields("t", _INT), *_fields("r", FieldType.DECIMAL_OR_NULL)),
}  # fmt: skip
FIELDS |= {kind: FIELDS["depth5"] for kind in ("depth10", "depth20")}
FIELDS |= {kind: FIELDS["ticker_1h"] for kind in ("ticker_4h", "ticker_1d")}
"""Spot's stream kind -> the payload fields that fill its table's columns, in column
order (see storage.TABLE_COLUMNS), `received_at` and `received_seq` last and not fields. With
`streams.KIND_TABLES`, the whole mapping from Binance's spot payloads to SQL, and the
replay's way back (the futures kinds have hand-written builders, below). A partial
depth payload names neither its symbol nor its depth: the table's first two columns
(symbol, levels) come from the stream name."""

_READERS: dict[FieldType, Callable[[Payload, str], Any]] = {
    FieldType.TEXT: _text,
    FieldType.INT: _int,
    FieldType.DECIMAL: _price,
    FieldType.DECIMAL_OR_NULL: _price_or_null,
    FieldType.FLAG: _flag,
    FieldType.LEVELS: _levels,
    FieldType.WINDOW: _window,
}


def _values_reader(fields: tuple[Field, ...]) -> Callable[[Payload], list[Any]]:
    """The column values of a payload, each field read and type-checked by its reader."""
    steps = [(_READERS[field.type], field.path[:-1], field.path[-1]) for field in fields]

    def values(d: Payload) -> list[Any]:
        return [read(_object(d, inner[0]) if inner else d, name) for read, inner, name in steps]

    return values


def _checked_builder(kind: str) -> RowBuilder:
    """The row builder of a kind, made from its FIELDS: a call per field, types checked."""
    values = _values_reader(FIELDS[kind])

    def build(d: Payload, received_at: int | None, seq: int | None) -> Row:
        return (*values(d), received_at, seq)

    return build


_CHECKED_BUILDERS: dict[str, RowBuilder] = {kind: _checked_builder(kind) for kind in FIELDS}


@functools.lru_cache(maxsize=1024)
def _partial_depth_builder(stream: str) -> RowBuilder:
    """Partial depth payloads name neither symbol nor depth: the stream name does."""
    symbol = stream.partition("@")[0].upper()
    kind = stream_kind(stream)
    levels = int(kind.removeprefix("depth"))
    values = _values_reader(FIELDS[kind])

    def build(d: Payload, received_at: int | None, seq: int | None) -> Row:
        return (symbol, levels, *values(d), received_at, seq)

    return build


def _no_symbol_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    raise _FrameError("partial depth outside a combined stream: its symbol is unknown")


# Fast builders: the same rows from frames as Binance sends them, with the fields
# read at once and their types checked in one expression. With the route cache in
# `parse_frames` they take a trade frame from 2.33 to 1.96 us and the drain from
# 120k to 131k rows/s (bench/drain.py, 12 interleaved rounds). Anything else, a
# missing field, a wrong type, a price that is not a decimal string, goes to the
# checked builder, which names the culprit or accepts the value after all (a price
# sent as a JSON number), so the outcome is always the checked builder's. The kinds
# that carry the volume have one: a trade or a book change per frame.


def _fast_trade_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    try:
        s, t, trade_time, m, e = d["s"], d["t"], d["T"], d["m"], d["E"]
        if type(s) is str and type(t) is type(trade_time) is type(e) is int and type(m) is bool:
            return (s, t, float(d["p"]), float(d["q"]), trade_time, m, e, received_at, seq)
    except (KeyError, TypeError, ValueError):
        pass
    return _CHECKED_BUILDERS["trade"](d, received_at, seq)


def _fast_agg_trade_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    try:
        s, a, f, last, trade_time, m, e = d["s"], d["a"], d["f"], d["l"], d["T"], d["m"], d["E"]
        if (
            type(s) is str
            and type(a) is type(f) is type(last) is type(trade_time) is type(e) is int
            and type(m) is bool
        ):
            return (s, a, float(d["p"]), float(d["q"]), f, last, trade_time, m, e, received_at, seq)
    except (KeyError, TypeError, ValueError):
        pass
    return _CHECKED_BUILDERS["aggTrade"](d, received_at, seq)


def _fast_book_ticker_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """A quarter of the whole market's frames (bench/market.py's mix)."""
    try:
        s, u = d["s"], d["u"]
        if type(s) is str and type(u) is int:
            return (s, u, float(d["b"]), float(d["B"]), float(d["a"]), float(d["A"]), received_at, seq)
    except (KeyError, TypeError, ValueError):
        pass
    return _CHECKED_BUILDERS["bookTicker"](d, received_at, seq)


def _fast_depth_update_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """Measured (timeit, 20 levels): 3.4 us against 4.1 for the checked builder."""
    try:
        s, last, first, e = d["s"], d["u"], d["U"], d["E"]
        if type(s) is str and type(last) is type(first) is type(e) is int:
            return (s, last, first, e, pack_levels(d["b"]), pack_levels(d["a"]), received_at, seq)
    except (KeyError, TypeError, BadLevels):
        pass
    return _CHECKED_BUILDERS["depth"](d, received_at, seq)


# Futures row builders (USDⓈ-M and COIN-M payloads have the same fields; COIN-M's
# quantities are contracts). Where a kind has a spot table, its futures table has
# spot's columns first, then the fields futures add (see storage._FUTURES_TABLES).
# Not stored: `st` and `ps` (the market and pair: the table and the symbol say them),
# and the fields Binance documents as "ignore".


def _futures_trade_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """The undocumented futures `@trade` adds `X`, the trade type (MARKET, INSURANCE_FUND, ADL...)."""
    return (*_fast_trade_row(d, received_at, seq)[:-2], _optional_text(d, "X"), received_at, seq)


def _futures_agg_trade_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """`nq`: the quantity without RPI orders (2025 on; absent before)."""
    return (*_fast_agg_trade_row(d, received_at, seq)[:-2], _optional_price(d, "nq"), received_at, seq)


def _futures_ticker_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """Spot's 24 h ticker without `x`, `b`, `B`, `a`, `A`: futures tickers have no
    previous close and no best bid or ask."""
    return (
        _text(d, "s"), _int(d, "E"),
        _price(d, "p"), _price(d, "P"), _price(d, "w"), _price(d, "c"), _price(d, "Q"),
        _price(d, "o"), _price(d, "h"), _price(d, "l"), _price(d, "v"), _price(d, "q"),
        _int(d, "O"), _int(d, "C"), _int(d, "F"), _int(d, "L"), _int(d, "n"), received_at, seq,
    )  # fmt: skip


def _futures_book_ticker_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    return (*_fast_book_ticker_row(d, received_at, seq)[:-2], _int(d, "E"), _int(d, "T"), received_at, seq)


def _futures_depth_update_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    return (*_fast_depth_update_row(d, received_at, seq)[:-2], _int(d, "pu"), _int(d, "T"), received_at, seq)


@functools.lru_cache(maxsize=1024)
def _futures_partial_depth_builder(stream: str) -> RowBuilder:
    """Futures' `@depth<N>` payload is a whole depth event of the top N levels: it names
    its symbol, and the stream name says N."""
    levels = int(stream_kind(stream).removeprefix("depth"))

    def build(d: Payload, received_at: int | None, seq: int | None) -> Row:
        return (
            _text(d, "s"), levels, _int(d, "u"), _levels(d, "b"), _levels(d, "a"),
            _int(d, "U"), _int(d, "pu"), _int(d, "E"), _int(d, "T"), received_at, seq,
        )  # fmt: skip

    return build


def _mark_price_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """Funding rate `r` "" and next funding time `T` 0 (COIN-M delivery contracts: no
    funding) are stored as NULL, as are `i` and `P` where older payloads lack them."""
    return (
        _text(d, "s"), _int(d, "E"), _price(d, "p"),
        _optional_price(d, "i"), _optional_price(d, "P"), _optional_price(d, "r"),
        _int(d, "T") or None, received_at, seq,
    )  # fmt: skip


def _liquidation_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    o = _object(d, "o")
    return (
        _text(o, "s"), _int(o, "T"), _int(d, "E"),
        _text(o, "S"), _text(o, "o"), _text(o, "f"), _text(o, "X"),
        _price(o, "q"), _price(o, "p"), _price(o, "ap"), _price(o, "l"), _price(o, "z"),
        received_at, seq,
    )  # fmt: skip


def _candle(k: Payload) -> tuple[Any, ...]:
    """Interval, open and close time, open, high, low, close: what every kline has."""
    return (
        _text(k, "i"), _int(k, "t"), _int(k, "T"),
        _price(k, "o"), _price(k, "h"), _price(k, "l"), _price(k, "c"),
    )  # fmt: skip


def _continuous_kline_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    k = _object(d, "k")
    return (
        _text(d, "ps"), _text(d, "ct"), *_candle(k),
        _price(k, "v"), _price(k, "q"), _int(k, "n"), _price(k, "V"), _price(k, "Q"),
        _int(k, "f"), _int(k, "L"), _flag(k, "x"), _int(d, "E"), received_at, seq,
    )  # fmt: skip


def _mark_price_kline_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """Its volumes, counts and ids are Binance's "ignore" fields."""
    k = _object(d, "k")
    return (_text(k, "s"), *_candle(k), _flag(k, "x"), _int(d, "E"), received_at, seq)


def _index_price_kline_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """An index is a pair's (`ps`); `k.s` is "0"."""
    k = _object(d, "k")
    return (_text(d, "ps"), *_candle(k), _flag(k, "x"), _int(d, "E"), received_at, seq)


def _index_price_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    return (_text(d, "i"), _int(d, "E"), _price(d, "p"), received_at, seq)


def _composite_index_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    components = d["c"]
    if type(components) is not list:
        raise _BadField(f"field 'c' = {components!r}, expected a list of components")
    return (
        _text(d, "s"), _int(d, "E"), _price(d, "p"), _optional_text(d, "C"),
        orjson.dumps(components).decode(), received_at, seq,
    )  # fmt: skip


def _contract_info_row(d: Payload, received_at: int | None, seq: int | None) -> Row:
    """`bks` (the leverage brackets) is not stored."""
    return (
        _text(d, "s"), _int(d, "E"), _text(d, "ps"), _text(d, "ct"), _int(d, "dt"), _int(d, "ot"),
        _text(d, "cs"), received_at, seq,
    )  # fmt: skip


_ROW_BUILDERS: dict[str, RowBuilder] = {
    **_CHECKED_BUILDERS,
    "trade": _fast_trade_row,
    "aggTrade": _fast_agg_trade_row,
    "bookTicker": _fast_book_ticker_row,
    "depth": _fast_depth_update_row,
    "depth5": _no_symbol_row,  # replaced per stream by _partial_depth_builder
    "depth10": _no_symbol_row,
    "depth20": _no_symbol_row,
}
"""Spot's stream kind -> row builder: the checked builders, and faster ones where volume is."""

_FUTURES_ROW_BUILDERS: dict[str, RowBuilder] = {
    "trade": _futures_trade_row,
    "aggTrade": _futures_agg_trade_row,
    "kline": _CHECKED_BUILDERS["kline"],
    "ticker": _futures_ticker_row,
    "miniTicker": _CHECKED_BUILDERS["miniTicker"],
    "bookTicker": _futures_book_ticker_row,
    "depth": _futures_depth_update_row,
    "depth5": _no_symbol_row,  # replaced per stream by _futures_partial_depth_builder
    "depth10": _no_symbol_row,
    "depth20": _no_symbol_row,
    "markPrice": _mark_price_row,
    "forceOrder": _liquidation_row,
    "continuousKline": _continuous_kline_row,
    "markPriceKline": _mark_price_kline_row,
    "indexPriceKline": _index_price_kline_row,
    "indexPrice": _index_price_row,
    "compositeIndex": _composite_index_row,
    "contractInfo": _contract_info_row,
}
"""The futures markets' stream kind -> row builder (both markets' payloads are alike)."""


KNOWN_STREAMS_KEPT = 100_000
"""Most stream routes a market's parser keeps (`_MarketRoutes.streams`): a whole market
subscribed is 6,000 streams or so; a process that sees many more over its life (names
that come and go) starts again rather than grow."""


@dataclass(frozen=True, slots=True)
class _MarketRoutes:
    """How the frames of one market's lists become rows."""

    kinds: dict[str, tuple[str, RowBuilder]]  # stream kind -> (its table in this market, its builder)
    partial_depth: Callable[[str], RowBuilder]  # the builder of a `@depth<N>` stream, by its name
    by_st: bool  # futures: every event's `st` says its market (see `_add_by_market`)
    streams: dict[str, tuple[str, RowBuilder, str]] = field(default_factory=dict)
    """Combined stream name -> (kind, builder, table) of the streams routed so far, by any
    batch, so that most frames skip `_route`. A whole market's lists hold 6,000 streams
    and a drain round a few hundred frames of each list: kept per batch, a third of the
    frames were the first of their stream in their batch and routed (docs/performance.md).
    Emptied when it reaches `KNOWN_STREAMS_KEPT`."""


def _market_routes(market: Market) -> _MarketRoutes:
    futures = market.st is not None
    builders = _FUTURES_ROW_BUILDERS if futures else _ROW_BUILDERS
    return _MarketRoutes(
        kinds={kind: (market.table(kind), builders[kind]) for kind in market.kinds},
        partial_depth=_futures_partial_depth_builder if futures else _partial_depth_builder,
        by_st=futures,
    )


_ROUTES: dict[str, _MarketRoutes] = {name: _market_routes(market) for name, market in MARKETS.items()}

# Raw `/ws/` streams send bare payloads: the event type `e` names the kind (and the
# replay, reading it backwards, the event type of a kind).
EVENT_KINDS: dict[str, str] = {
    "trade": "trade",
    "aggTrade": "aggTrade",
    "kline": "kline",
    "24hrTicker": "ticker",
    "24hrMiniTicker": "miniTicker",
    "avgPrice": "avgPrice",
    "depthUpdate": "depth",  # futures' partial depth too: only its combined stream's name tells it apart
    "1hTicker": "ticker_1h",
    "4hTicker": "ticker_4h",
    "1dTicker": "ticker_1d",
    "blockTrade": "blockTrade",
    "referencePrice": "referencePrice",
    "bookTicker": "bookTicker",  # futures' has an event type; spot's is known by its shape
    "markPriceUpdate": "markPrice",
    "forceOrder": "forceOrder",
    "continuous_kline": "continuousKline",
    "markPrice_kline": "markPriceKline",
    "indexPrice_kline": "indexPriceKline",
    "indexPriceUpdate": "indexPrice",
    "compositeIndex": "compositeIndex",
    "contractInfo": "contractInfo",
    "serverShutdown": CONTROL,
}
_PARTIAL_DEPTH_KINDS = frozenset({"depth5", "depth10", "depth20"})
_BOOK_TICKER_FIELDS = frozenset(field.path[0] for field in FIELDS["bookTicker"])  # no `e`: known by its shape


def parse_frames(elements: Iterable[bytes], market: str = SPOT) -> ParsedBatch:
    """Parse a batch of Redis list elements (frames and clock marks) of one `market`'s
    list (see `RedisKeys.frames_market`) into rows.

    The rows have every table of `market` (maybe empty), and the tables of another
    futures market that events of an all-market stream named (`_add_by_market`).

    A clock mark `b"@<ms>"` is the receive time of the frames after it, up to the next
    mark; every row takes it as `received_at`, and the place of its frame after the
    mark (0, 1, ...) as `received_seq`. A batch starts with a mark, because the
    drain's acknowledgement puts the last mark back in front of a list whose head is
    left in the middle of a flush (`FrameBuffer.ack`), with the place of the frame it
    now stands before (`b"@<ms>:<place>"`), so that a frame's place is the same
    whatever batch it comes in; rows before any mark (a list written by an older
    version) get None and their place in the batch.
    """
    routes = _ROUTES[market_named(market).name]
    by_st = routes.by_st
    rows: dict[str, list[Row]] = {table: [] for table, _ in routes.kinds.values()}
    known = routes.streams
    dead_letters: list[DeadLetter] = []
    frames = control = 0
    received_at: int | None = None
    seq = -1  # the place of the current frame in its flush: counts every frame, stored or not
    for element in elements:
        if element[:1] == CLOCK_MARK_PREFIX:
            received_at, offset = _clock_mark(element, dead_letters)
            seq = offset - 1
            continue
        frames += 1
        seq += 1
        kind = "frame"  # until known, for the reasons below
        try:
            message = orjson.loads(element)
            try:
                kind, build, table = known[message["stream"]]
                payload = message["data"]
            except (KeyError, TypeError):  # not a combined frame of a known stream
                payload = None
            if payload is None:
                kind, payload = _route(message, market)
                if kind == CONTROL:
                    control += 1
                    continue
                table, build = routes.kinds[kind]
                if kind in _PARTIAL_DEPTH_KINDS:
                    build = routes.partial_depth(message["stream"])
                if type(message) is dict and "stream" in message:  # combined: remember it
                    if len(known) >= KNOWN_STREAMS_KEPT:
                        known.clear()
                    known[message["stream"]] = (kind, build, table)
            if by_st:
                _add_by_market(kind, build, payload, market, rows, received_at, seq)
            elif type(payload) is list:  # !miniTicker@arr, !ticker_<w>@arr: one row per symbol
                rows[table].extend([build(item, received_at, seq) for item in payload])
            else:
                rows[table].append(build(payload, received_at, seq))
        except orjson.JSONDecodeError as error:
            dead_letters.append(DeadLetter(element, f"invalid JSON: {error}"))
        except _FrameError as error:
            dead_letters.append(DeadLetter(element, str(error)))
        except _BadField as error:
            dead_letters.append(DeadLetter(element, f"{kind} frame has {error}"))
        except KeyError as error:
            dead_letters.append(DeadLetter(element, f"{kind} frame lacks field {error}"))
        except TypeError:  # indexing a payload that is a list, a number, a string...
            dead_letters.append(DeadLetter(element, f"{kind} payload is not a JSON object"))
        except Exception as error:  # noqa: BLE001 - a frame must never stop the drain
            dead_letters.append(DeadLetter(element, f"{kind} frame failed: {error!r}"))
    return ParsedBatch(rows, dead_letters, control, frames, received_at, seq + 1)


def _add_by_market(
    kind: str,
    build: RowBuilder,
    payload: Any,
    home: str,
    rows: dict[str, list[Row]],
    received_at: int | None,
    seq: int,
) -> None:
    """Futures events: each in the table of the market its `st` names, else of the list's (`home`).

    Since COIN-M moved onto the USDⓈ-M engine, an all-market stream (`!markPrice@arr`,
    `!ticker@arr`, `!forceOrder@arr`...) on either host carries both markets' events,
    each with `st` (1 USDⓈ-M, 2 COIN-M); a symbol's own stream carries its market's.
    All of a frame's rows or none: one bad event dead-letters its whole frame.
    """
    events = payload if type(payload) is list else (payload,)
    built = [(build(event, received_at, seq), _event_table(kind, event, home)) for event in events]
    for row, table in built:
        rows.setdefault(table, []).append(row)


def _event_table(kind: str, event: Payload, home: str) -> str:
    st = event.get("st")
    if st is None and kind == "forceOrder":
        # Binance does not document where a liquidation's `st` is: the event's, else its order's.
        st = event["o"].get("st")
    if st is None:
        return _table_of(home, kind)
    try:
        return _table_of(market_of_st(st), kind)
    except ValueError as error:
        raise _FrameError(f"{kind} event: {error}") from None


@functools.lru_cache(maxsize=64)
def _table_of(market: str, kind: str) -> str:
    """`kind`'s table in `market`; a kind the market does not have is a bad frame."""
    try:
        return MARKETS[market].table(kind)
    except ValueError as error:
        raise _FrameError(str(error)) from None


def _clock_mark(element: bytes, dead_letters: list[DeadLetter]) -> tuple[int | None, int]:
    """The mark's time and the place in its flush of the frame after it; a garbled
    mark is dead-lettered and makes the time unknown."""
    try:
        return parse_clock_mark(element)
    except ValueError:
        dead_letters.append(DeadLetter(element, "invalid clock mark: expected @<ms> or @<ms>:<place>"))
        return None, 0


def _route(message: Any, market: str) -> tuple[str, Any]:
    """The stream kind of a decoded frame (or CONTROL) and its payload."""
    if type(message) is not dict:
        if type(message) is list:  # !miniTicker@arr or !ticker_<w>@arr: the items say which
            first = message[0] if message else None
            return (_payload_kind(first, market) if type(first) is dict else "miniTicker"), message
        raise _FrameError(f"unexpected JSON {type(message).__name__}, expected an object")
    stream = message.get("stream")
    if stream is None:
        return _payload_kind(message, market), message
    if type(stream) is not str:
        raise _FrameError(f"combined frame has a non-string stream name {stream!r}")
    payload = message.get("data")
    if payload is None:
        raise _FrameError(f"combined frame of stream {stream!r} lacks data")
    return _combined_stream_kind(stream, market), payload


@functools.lru_cache(maxsize=1024)
def _combined_stream_kind(stream: str, market: str) -> str:
    """The kind of a combined stream, or CONTROL; cached: a connection has few streams."""
    kind = stream_kind(stream)
    if kind in _ROUTES[market].kinds:
        return kind
    if kind == "serverShutdown":
        return CONTROL
    raise _FrameError(f"unsupported stream kind {kind!r} (stream {stream!r}) in a {market} list")


def _payload_kind(payload: Payload, market: str) -> str:
    """The kind of a bare payload (raw `/ws/` stream), or CONTROL."""
    event = payload.get("e")
    if type(event) is str:
        kind = EVENT_KINDS.get(event)
        if kind is None or (kind != CONTROL and kind not in _ROUTES[market].kinds):
            raise _FrameError(f"unsupported event type {event!r} in a {market} list")
        return kind
    if event is not None:
        raise _FrameError(f"event type {event!r} is not a string")
    if "result" in payload and "id" in payload:
        return CONTROL  # the answer to a SUBSCRIBE, LIST_SUBSCRIPTIONS... request
    if payload.keys() >= _BOOK_TICKER_FIELDS:
        return "bookTicker"
    fields = ", ".join(payload) or "none"
    raise _FrameError(f"unsupported payload without event type (fields: {fields})")
