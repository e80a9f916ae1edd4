"""The recorded frames of a time window, in the order they were received.

`events` is what a backtest without sockets reads, and what a replay server sends:
`(received_at_ms, stream_name, payload)` for every recorded row of the window, the
payload rebuilt as Binance sent it (see `frames`).

Rows stream from the database: one query per table, each ordered by `received_at`
and read in chunks of `CHUNK_ROWS`, merged with `heapq.merge`. Memory holds a chunk
per table and the rows of one receive time, never the window. `received_at` is
indexed where it is the table's time column (book tickers, partial depth) and in
depth_updates (the largest rows, read from the middle of an hour of books):
elsewhere the database scans the table and sorts the window's rows itself (SQLite
in its temporary store) before the first row comes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine, Select, select

from worker.replay import frames
from worker.store.parsing import Payload, Row
from worker.store.storage import TABLE_COLUMNS, TABLES, TIME_COLUMNS
from worker.streams import (
    ALL_MARKET_STREAMS,
    DEPTH_KINDS,
    FAST_SPEED,
    KIND_TABLES,
    kind_family,
    validate_stream_kind,
)
from worker.times import check_range, iso_ms

Event = tuple[int, str, Payload]
"""(received_at in ms, stream name, payload)."""

CHUNK_ROWS = 1000
"""Rows fetched at a time from each table's cursor."""

STREAM_TABLES: tuple[str, ...] = tuple(dict.fromkeys(KIND_TABLES.values()))
"""The tables a stream fills, in the order that breaks the last ties between them."""


def events(
    engine: Engine,
    start_ms: int,
    end_ms: int,
    symbols: Iterable[str] | None = None,
    streams: Iterable[str] | None = None,
) -> Iterator[Event]:
    """The recorded events received in [start_ms, end_ms), in the order received.

    `symbols` ("BTCUSDT", any case) and `streams` (stream kinds as `subscribe` takes
    them: "trade", "kline_1m", "depth@100ms", "depth20") narrow the selection; None
    takes everything. A depth kind asked for without `@100ms` is named with Binance's
    1 s stream name, otherwise with `@100ms`: the rows do not say which was recorded.
    Rows stored from REST (backfill, snapshots) have no receive time and are not events.

    Order: by `received_at`, the clock mark of the flush that carried the frame,
    then by `received_seq`, the frame's place in its flush: the frames of one flush
    (up to 50 ms of one connection, every stream of it) come in the order they were
    received. Two connections that flushed in the same millisecond interleave by
    place; the rows of one frame (an all-market array), and rows stored before
    `received_seq` existed (NULL: they come first in their millisecond), go by event
    time (`E`; `t` for referencePrice), then by table, symbol and key.

    Raises ValueError, with a one-line message, on an empty window, an unknown
    stream kind, or a symbol with no recorded rows in the window. Checked at the
    call, before the first event is asked for.
    """
    check_range(start_ms, end_ms)
    wanted, fast = _wanted_kinds(streams)
    tables = list(STREAM_TABLES) if wanted is None else [t for t in STREAM_TABLES if t in _tables_of(wanted)]
    names = _checked_symbols(engine, tables, start_ms, end_ms, symbols)
    return _merged(engine, tables, start_ms, end_ms, names, wanted, fast)


def _wanted_kinds(streams: Iterable[str] | None) -> tuple[set[str] | None, set[str]]:
    """The kinds asked for ("kline_1m", "depth") as `frames.row_kind` names them, or
    None for all; and the depth kinds named `@100ms`."""
    if streams is None:
        return None, set(DEPTH_KINDS)
    wanted: set[str] = set()
    fast: set[str] = set()
    for asked in streams:
        canonical = validate_stream_kind(asked)
        if canonical in ALL_MARKET_STREAMS:
            raise ValueError(f"{canonical} is replayed per symbol: ask for {canonical[1:].partition('@')[0]} instead")
        kind, at, speed = canonical.partition("@")
        if kind in wanted and (kind in fast) != bool(at):
            raise ValueError(f"{kind} and {kind}@{FAST_SPEED} are the same recorded rows: ask for one of them")
        wanted.add(kind)
        if speed:
            fast.add(kind)
    return wanted, fast


def _tables_of(kinds: set[str]) -> set[str]:
    """The tables that hold these kinds; a kind a table shares (kline_1m) is picked
    from its rows as they come."""
    return {KIND_TABLES[kind_family(kind)] for kind in kinds}


def _checked_symbols(
    engine: Engine, tables: list[str], start_ms: int, end_ms: int, symbols: Iterable[str] | None
) -> list[str] | None:
    """The symbols asked for, uppercase, each with rows in the window; or None for all."""
    if symbols is None:
        return None
    names = sorted({symbol.upper() for symbol in symbols})
    with engine.connect() as conn:
        for name in names:
            if not any(_has_rows(conn, table, name, start_ms, end_ms) for table in tables):
                raise ValueError(
                    f"no recorded {name} rows were received between {iso_ms(start_ms)} and {iso_ms(end_ms)}: "
                    "check the symbol and the window (binance-recorder status lists what is recorded)"
                )
    return names


def recorded_symbols(engine: Engine, start_ms: int, end_ms: int) -> list[str]:
    """The symbols with rows received in [start_ms, end_ms), sorted."""
    found: set[str] = set()
    with engine.connect() as conn:
        for table_name in STREAM_TABLES:
            query = _in_window(select(TABLES[table_name].c.symbol).distinct(), table_name, start_ms, end_ms)
            found.update(conn.scalars(query))
    return sorted(found)


def _has_rows(conn: Connection, table_name: str, symbol: str, start_ms: int, end_ms: int) -> bool:
    table = TABLES[table_name]
    query = _in_window(select(table.c.symbol), table_name, start_ms, end_ms).where(table.c.symbol == symbol)
    return conn.execute(query.limit(1)).first() is not None


def _in_window(query: Select[Any], table_name: str, start_ms: int, end_ms: int) -> Select[Any]:
    received_at = TABLES[table_name].c.received_at
    return query.where(received_at >= start_ms, received_at < end_ms)


def _merged(
    engine: Engine,
    tables: list[str],
    start_ms: int,
    end_ms: int,
    symbols: list[str] | None,
    wanted: set[str] | None,
    fast: set[str],
) -> Iterator[Event]:
    """The generator behind `events`: its connection lives as long as the iteration."""
    with engine.connect() as conn:
        streaming = conn.execution_options(yield_per=CHUNK_ROWS)
        cursors = [_ordered_rows(streaming, table, start_ms, end_ms, symbols) for table in tables]
        merged = heapq.merge(*cursors, key=_received_at)
        for _, flush in itertools.groupby(merged, key=_received_at):
            for _key, row, table in sorted(_tie_broken(flush)):
                kind = frames.row_kind(table, row)
                if wanted is None or kind in wanted:
                    name = frames.stream_name(table, row, fast_depth=kind in fast)
                    yield row[_RECEIVED_AT], name, frames.payload(table, row)


_RECEIVED_AT, _RECEIVED_SEQ = -2, -1
"""Where every row keeps `received_at` and `received_seq` (storage's `_received`: last)."""


def _received_at(item: tuple[Row, str]) -> int:
    return item[0][_RECEIVED_AT]


def _ordered_rows(
    conn: Connection, table_name: str, start_ms: int, end_ms: int, symbols: list[str] | None
) -> Iterator[tuple[Row, str]]:
    """A table's rows of the window as (row, table), by `received_at`."""
    table = TABLES[table_name]
    query = _in_window(select(table), table_name, start_ms, end_ms).order_by(table.c.received_at)
    if symbols is not None:
        query = query.where(table.c.symbol.in_(symbols))
    for row in conn.execute(query):
        yield tuple(row), table_name


def _tie_broken(flush: Iterable[tuple[Row, str]]) -> Iterator[tuple[tuple[Any, ...], Row, str]]:
    """Rows of one receive time with their sort key: place in the flush (-1 where
    unknown: rows stored before `received_seq` existed), event time, table, primary key."""
    for row, table in flush:
        seq = row[_RECEIVED_SEQ]
        yield (
            (-1 if seq is None else seq, row[_EVENT_TIME_INDEX[table]], _TABLE_RANK[table], *_key(table, row)),
            row,
            table,
        )


def _event_time_column(table_name: str) -> str:
    """`event_time` (Binance's `E`) where a table keeps it, else its time column:
    `time` for reference prices, `received_at` for what carries no time."""
    return "event_time" if "event_time" in TABLE_COLUMNS[table_name] else TIME_COLUMNS[table_name]


_EVENT_TIME_INDEX = {table: TABLE_COLUMNS[table].index(_event_time_column(table)) for table in STREAM_TABLES}
_TABLE_RANK = {table: rank for rank, table in enumerate(STREAM_TABLES)}
_KEY_INDEXES = {
    table: tuple(TABLE_COLUMNS[table].index(column.name) for column in TABLES[table].primary_key.columns)
    for table in STREAM_TABLES
}


def _key(table: str, row: Row) -> tuple[Any, ...]:
    return tuple(row[index] for index in _KEY_INDEXES[table])
