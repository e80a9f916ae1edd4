"""Binance's websocket payloads rebuilt from stored rows: `parsing` read backwards.

The parser's `FIELDS` table says which payload field fills which column and how it
is read; every function here inverts that table rather than keeping a second
mapping, so a field added to the parser is replayed as well. A rebuilt payload
parses back into the row it came from (tests/test_replay_frames.py checks every
kind, on Binance's documented examples and on the fake exchange's frames).

What a row cannot give back, and what a rebuilt payload therefore differs in:

- The exact decimal strings. A price or quantity is stored as a float64, which keeps
  its value but not its trailing zeros. Binance's spot streams write 8 decimals
  ("0.00100000"), percentages 3 ("-1.234"); a value is written that way whenever
  that form reads back to the same float, else in its shortest exact form
  ("0.000000001"). A documented example's "0.001" thus comes back as "0.00100000",
  the same number.
- Fields Binance sends that no column keeps: `M` of trades ("ignore"), `B` of a
  kline ("ignore"). The kline's inner symbol `k.s` is the payload's `s` again and is
  written back from it.
- The order of a payload's keys (JSON objects are unordered; no client relies on it):
  `e` comes first, then the fields in the column order of the table.
- Which of several streams a row was received on; `stream_name` takes the choice:
  a diff or partial depth row does not say whether it came at 1 s or at 100 ms
  (`fast_depth`), a kline row not whether its stream named a time zone
  (`@kline_1m@+08:00`), a mini ticker or window ticker row not whether it came
  alone or in an all-market array (`!miniTicker@arr`): it is named by its symbol.
- Klines: a row is the last update stored for its open time (an open kline is
  replaced until it closes), so the updates before it are gone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from worker.store.depth import unpack_levels
from worker.store.parsing import EVENT_KINDS, FIELDS, FieldType, Payload, Row
from worker.store.storage import RECEIVED_COLUMNS, TABLE_COLUMNS
from worker.streams import DEPTH_KINDS, FAST_SPEED, KIND_TABLES, kind_family

BINANCE_DECIMALS = 8
"""Decimal places of the prices and quantities in Binance's spot streams."""

PERCENT_DECIMALS = 3
"""Decimal places of a ticker's price change percent `P`."""

_PERCENT_FIELD = "P"

_SHAPE_KINDS = frozenset({"bookTicker"})
"""Spot kinds known by their shape: spot's bookTicker has no `e` (futures' has, whence
its entry in EVENT_KINDS)."""

_KIND_EVENTS = {kind: event for event, kind in EVENT_KINDS.items() if kind in FIELDS and kind not in _SHAPE_KINDS}
"""Spot's stream kind -> its event type `e`; bookTicker and partial depth have none."""

_SINGLE_KIND_TABLES = {
    table: kind for kind, table in KIND_TABLES.items() if list(KIND_TABLES.values()).count(table) == 1
}
"""Tables that hold one kind. The others say the kind in a column: see `row_kind`."""


def decimal_string(value: float, places: int = BINANCE_DECIMALS) -> str:
    """A stored price or quantity as Binance writes it, as far as the float tells.

    The float's shortest exact decimal (what `repr` prints), padded to `places`
    decimals when it has no more ("0.001" -> "0.00100000"), else as it is (1e-9 ->
    "0.000000001"). It reads back as the same float, and it is the text Binance sent
    whenever that text had at most 15 significant digits (what a float64 keeps for
    sure); past those, a large volume's last digits are lost ("23343287190.60209274"
    comes back as "23343287190.60209300"). The float's own 8 decimals would show its
    binary noise instead: "100000000.09999999" for a stored "100000000.10000000".
    """
    text = repr(value)
    whole, dot, fraction = text.partition(".")
    if dot and "e" not in fraction:  # the common case, in plain string operations (a replay's hot path)
        return text if len(fraction) > places else f"{whole}.{fraction:0<{places}}"
    shortest = Decimal(text)  # 1e-05, 1e+16, inf
    exponent = shortest.as_tuple().exponent
    if isinstance(exponent, int) and -exponent <= places:
        return f"{shortest:.{places}f}"
    return format(shortest, "f")


def _decimal(value: float, name: str) -> str:
    return decimal_string(value, PERCENT_DECIMALS if name == _PERCENT_FIELD else BINANCE_DECIMALS)


def _levels(value: bytes, name: str) -> list[list[str]]:
    return [[decimal_string(price), decimal_string(qty)] for price, qty in unpack_levels(value)]


_WRITERS: dict[FieldType, Callable[[Any, str], Any]] = {
    FieldType.TEXT: lambda value, name: str(value),
    FieldType.INT: lambda value, name: int(value),
    FieldType.DECIMAL: _decimal,
    FieldType.DECIMAL_OR_NULL: lambda value, name: None if value is None else _decimal(value, name),
    FieldType.FLAG: lambda value, name: bool(value),
    FieldType.LEVELS: _levels,
    FieldType.WINDOW: lambda value, name: f"{value}Ticker",  # "1h" -> "1hTicker"
}
"""Column value -> payload value, per field type: each undoes a reader of `parsing`."""


def row_kind(table: str, row: Row) -> str:
    """The stream kind of a row as a user names it: "trade", "kline_1m", "depth5",
    "ticker_1h". Three tables hold several kinds and say which in a column."""
    if table == "klines":
        return f"kline_{_column(table, row, 'interval')}"
    if table == "partial_depth":
        return f"depth{_column(table, row, 'levels')}"
    if table == "window_tickers":
        return f"ticker_{_column(table, row, 'window')}"
    return _SINGLE_KIND_TABLES[table]


def _column(table: str, row: Row, column: str) -> Any:
    return row[TABLE_COLUMNS[table].index(column)]


def stream_name(table: str, row: Row, fast_depth: bool = True) -> str:
    """The stream a row is replayed on, e.g. "btcusdt@trade", "btcusdt@kline_1m".

    Depth rows are named `@100ms` when `fast_depth`, else by Binance's 1 s name: the
    row does not say which it was recorded from.
    """
    kind = row_kind(table, row)
    symbol = _column(table, row, "symbol").lower()
    speed = f"@{FAST_SPEED}" if fast_depth and kind in DEPTH_KINDS else ""
    return f"{symbol}@{kind}{speed}"


def payload(table: str, row: Row) -> Payload:
    """The payload Binance sent for a row, with every field the row keeps.

    `row` is in `TABLE_COLUMNS[table]` order, `received_at` and `received_seq` last. Partial depth rows
    begin with the symbol and the number of levels, which their payload lacks: they
    go to the stream name.
    """
    kind = kind_family(row_kind(table, row))
    plan = _plan(kind)
    from_stream = len(TABLE_COLUMNS[table]) - RECEIVED_COLUMNS - len(plan)  # columns the payload lacks
    rebuilt: Payload = {"e": _KIND_EVENTS[kind]} if kind in _KIND_EVENTS else {}
    for (inner, name, write), value in zip(plan, row[from_stream:-RECEIVED_COLUMNS], strict=True):
        target = rebuilt
        for part in inner:
            target = target.setdefault(part, {})
        target[name] = write(value, name)
    if kind == "kline":
        rebuilt["k"]["s"] = rebuilt["s"]  # Binance names the symbol in the kline too
    return rebuilt


@functools.cache
def _plan(kind: str) -> tuple[tuple[tuple[str, ...], str, Callable[[Any, str], Any]], ...]:
    """A kind's fields as (enclosing objects, name, writer), looked up once per kind
    rather than once per field of every row (a replay rebuilds a row per frame)."""
    return tuple((tuple(field.path[:-1]), field.path[-1], _WRITERS[field.type]) for field in FIELDS[kind])
