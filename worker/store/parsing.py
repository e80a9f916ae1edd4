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
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from worker.buffer import CLOCK_MARK_PREFIX
from worker.store.depth import BadLevels, pack_levels
from worker.streams import KIND_TABLES, stream_kind

Payload = dict[str, Any]
Row = tuple[Any, ...]
RowBuilder = Callable[[Payload, int | None], Row]

CONTROL = "control"
"""Pseudo kind of protocol messages that are not market data."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A frame that could not be stored, kept as received so it can be replayed."""

    frame: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    """The rows of a batch by table (every table present, maybe empty), and the rest."""

    rows: dict[str, list[Row]]
    dead_letters: list[DeadLetter]
    control: int  # protocol messages (serverShutdown, request answers): not data, not errors
    frames: int  # elements that were not clock marks
    last_mark: int | None  # the receive time in effect at the batch's end, for what follows it


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
"""Stream kind -> the payload fields that fill its table's columns, in column order (see
storage.TABLE_COLUMNS), `received_at` last and not a field. With `streams.KIND_TABLES`,
the whole mapping from Binance to SQL, and the replay's way back. A partial depth
payload names neither its symbol nor its depth: the table's first two columns
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

    def build(d: Payload, received_at: int | None) -> Row:
        return (*values(d), received_at)

    return build


_CHECKED_BUILDERS: dict[str, RowBuilder] = {kind: _checked_builder(kind) for kind in FIELDS}


@functools.lru_cache(maxsize=1024)
def _partial_depth_builder(stream: str) -> RowBuilder:
    """Partial depth payloads name neither symbol nor depth: the stream name does."""
    symbol = stream.partition("@")[0].upper()
    kind = stream_kind(stream)
    levels = int(kind.removeprefix("depth"))
    values = _values_reader(FIELDS[kind])

    def build(d: Payload, received_at: int | None) -> Row:
        return (symbol, levels, *values(d), received_at)

    return build


def _no_symbol_row(d: Payload, received_at: int | None) -> Row:
    raise _FrameError("partial depth outside a combined stream: its symbol is unknown")


# Fast builders: the same rows from frames as Binance sends them, with the fields
# read at once and their types checked in one expression. With the route cache in
# `parse_frames` they take a trade frame from 2.33 to 1.96 us and the drain from
# 120k to 131k rows/s (bench/drain.py, 12 interleaved rounds). Anything else, a
# missing field, a wrong type, a price that is not a decimal string, goes to the
# checked builder, which names the culprit or accepts the value after all (a price
# sent as a JSON number), so the outcome is always the checked builder's. The kinds
# that carry the volume have one: a trade or a book change per frame.


def _fast_trade_row(d: Payload, received_at: int | None) -> Row:
    try:
        s, t, trade_time, m, e = d["s"], d["t"], d["T"], d["m"], d["E"]
        if type(s) is str and type(t) is type(trade_time) is type(e) is int and type(m) is bool:
            return (s, t, float(d["p"]), float(d["q"]), trade_time, m, e, received_at)
    except (KeyError, TypeError, ValueError):
        pass
    return _CHECKED_BUILDERS["trade"](d, received_at)


def _fast_agg_trade_row(d: Payload, received_at: int | None) -> Row:
    try:
        s, a, f, last, trade_time, m, e = d["s"], d["a"], d["f"], d["l"], d["T"], d["m"], d["E"]
        if (
            type(s) is str
            and type(a) is type(f) is type(last) is type(trade_time) is type(e) is int
            and type(m) is bool
        ):
            return (s, a, float(d["p"]), float(d["q"]), f, last, trade_time, m, e, received_at)
    except (KeyError, TypeError, ValueError):
        pass
    return _CHECKED_BUILDERS["aggTrade"](d, received_at)


def _fast_depth_update_row(d: Payload, received_at: int | None) -> Row:
    """Measured (timeit, 20 levels): 3.4 us against 4.1 for the checked builder."""
    try:
        s, last, first, e = d["s"], d["u"], d["U"], d["E"]
        if type(s) is str and type(last) is type(first) is type(e) is int:
            return (s, last, first, e, pack_levels(d["b"]), pack_levels(d["a"]), received_at)
    except (KeyError, TypeError, BadLevels):
        pass
    return _CHECKED_BUILDERS["depth"](d, received_at)


_ROW_BUILDERS: dict[str, RowBuilder] = {
    **_CHECKED_BUILDERS,
    "trade": _fast_trade_row,
    "aggTrade": _fast_agg_trade_row,
    "depth": _fast_depth_update_row,
    "depth5": _no_symbol_row,  # replaced per stream by _partial_depth_builder
    "depth10": _no_symbol_row,
    "depth20": _no_symbol_row,
}
"""Stream kind -> row builder: the checked builders, and faster ones where volume is."""

_KINDS: dict[str, tuple[str, RowBuilder]] = {
    kind: (KIND_TABLES[kind], builder) for kind, builder in _ROW_BUILDERS.items()
}

# Raw `/ws/` streams send bare payloads: the event type `e` names the kind (and the
# replay, reading it backwards, the event type of a kind).
EVENT_KINDS: dict[str, str] = {
    "trade": "trade",
    "aggTrade": "aggTrade",
    "kline": "kline",
    "24hrTicker": "ticker",
    "24hrMiniTicker": "miniTicker",
    "avgPrice": "avgPrice",
    "depthUpdate": "depth",
    "1hTicker": "ticker_1h",
    "4hTicker": "ticker_4h",
    "1dTicker": "ticker_1d",
    "blockTrade": "blockTrade",
    "referencePrice": "referencePrice",
    "serverShutdown": CONTROL,
}
_PARTIAL_DEPTH_KINDS = frozenset({"depth5", "depth10", "depth20"})
_BOOK_TICKER_FIELDS = frozenset(field.path[0] for field in FIELDS["bookTicker"])  # no `e`: known by its shape


def parse_frames(elements: Iterable[bytes]) -> ParsedBatch:
    """Parse a batch of Redis list elements (frames and clock marks) into rows.

    A clock mark `b"@<ms>"` is the receive time of the frames after it, up to the next
    mark; every row takes it as `received_at`. A batch starts with a mark, because the
    drain's acknowledgement puts the last mark back in front of a list whose head is
    left in the middle of a flush (`FrameBuffer.ack`); rows before any mark (a list
    written by an older version) get None.
    """
    rows: dict[str, list[Row]] = {table: [] for table, _ in _KINDS.values()}
    sinks = {kind: (build, rows[table]) for kind, (table, build) in _KINDS.items()}
    # Combined stream name -> (kind, builder, sink) of the streams already seen in this
    # batch, so that most frames skip `_route`: 8% less time per trade frame.
    known: dict[str, tuple[str, RowBuilder, list[Row]]] = {}
    dead_letters: list[DeadLetter] = []
    frames = control = 0
    received_at: int | None = None
    for element in elements:
        if element[:1] == CLOCK_MARK_PREFIX:
            received_at = _clock_mark(element, dead_letters)
            continue
        frames += 1
        kind = "frame"  # until known, for the reasons below
        try:
            message = orjson.loads(element)
            try:
                kind, build, sink = known[message["stream"]]
                payload = message["data"]
            except (KeyError, TypeError):  # not a combined frame of a known stream
                payload = None
            if payload is None:
                kind, payload = _route(message)
                if kind == CONTROL:
                    control += 1
                    continue
                build, sink = sinks[kind]
                if kind in _PARTIAL_DEPTH_KINDS:
                    build = _partial_depth_builder(message["stream"])
                if type(message) is dict and "stream" in message:  # combined: remember it
                    known[message["stream"]] = (kind, build, sink)
            if type(payload) is list:  # !miniTicker@arr, !ticker_<w>@arr: one row per symbol
                sink.extend([build(item, received_at) for item in payload])
            else:
                sink.append(build(payload, received_at))
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
    return ParsedBatch(rows, dead_letters, control, frames, received_at)


def _clock_mark(element: bytes, dead_letters: list[DeadLetter]) -> int | None:
    """The mark's time; a garbled mark is dead-lettered and makes the time unknown."""
    try:
        return int(element[1:])
    except ValueError:
        dead_letters.append(DeadLetter(element, "invalid clock mark: expected @<ms>"))
        return None


def _route(message: Any) -> tuple[str, Any]:
    """The stream kind of a decoded frame (or CONTROL) and its payload."""
    if type(message) is not dict:
        if type(message) is list:  # !miniTicker@arr or !ticker_<w>@arr: the items say which
            first = message[0] if message else None
            return (_payload_kind(first) if type(first) is dict else "miniTicker"), message
        raise _FrameError(f"unexpected JSON {type(message).__name__}, expected an object")
    stream = message.get("stream")
    if stream is None:
        return _payload_kind(message), message
    if type(stream) is not str:
        raise _FrameError(f"combined frame has a non-string stream name {stream!r}")
    payload = message.get("data")
    if payload is None:
        raise _FrameError(f"combined frame of stream {stream!r} lacks data")
    return _combined_stream_kind(stream), payload


@functools.lru_cache(maxsize=1024)
def _combined_stream_kind(stream: str) -> str:
    """The kind of a combined stream, or CONTROL; cached: a connection has few streams."""
    kind = stream_kind(stream)
    if kind in _KINDS:
        return kind
    if kind == "serverShutdown":
        return CONTROL
    raise _FrameError(f"unsupported stream kind {kind!r} (stream {stream!r})")


def _payload_kind(payload: Payload) -> str:
    """The kind of a bare payload (raw `/ws/` stream), or CONTROL."""
    event = payload.get("e")
    if type(event) is str:
        kind = EVENT_KINDS.get(event)
        if kind is None:
            raise _FrameError(f"unsupported event type {event!r}")
        return kind
    if event is not None:
        raise _FrameError(f"event type {event!r} is not a string")
    if "result" in payload and "id" in payload:
        return CONTROL  # the answer to a SUBSCRIBE, LIST_SUBSCRIPTIONS... request
    if payload.keys() >= _BOOK_TICKER_FIELDS:
        return "bookTicker"
    fields = ", ".join(payload) or "none"
    raise _FrameError(f"unsupported payload without event type (fields: {fields})")
