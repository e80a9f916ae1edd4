"""Export one symbol's rows of one table, over a time range, to CSV or Parquet.

An export may cover months of trades, far more than fits in memory, so rows are read
with a streaming cursor a chunk at a time, ordered by the table's time column, and each
chunk is written before the next is fetched. The file is written under a temporary name
and renamed at the end, so an export that fails half way never leaves a truncated file
that looks complete.

The checks that explain an empty result (unknown symbol, range outside the data) are
shared with `worker.ops.chart`, which has the same questions to answer.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Table,
    func,
    literal,
    select,
)

from worker.store import dayfiles
from worker.store.storage import TABLE_COLUMNS, TABLES, TIME_COLUMNS
from worker.streams import KIND_TABLES, KLINE_INTERVALS, valid_kinds_text
from worker.times import check_range, iso_ms

if TYPE_CHECKING:
    pass

CHUNK_ROWS = 20_000
"""Rows fetched and written at a time. Measured on 300k trades: an export's peak Python
memory is about 16 MB at 20k rows (two chunks are alive while the next one is fetched),
42 MB at 50k, against 140 MB for the whole result, and it runs as fast."""

FORMATS = ("csv", "parquet")

_TABLE_NAMES: dict[str, str] = {
    **{kind.lower(): table for kind, table in KIND_TABLES.items()},
    **{table: table for table in TABLES},
}

_MAX_SYMBOLS_SHOWN = 10


Progress = Callable[[int], None]


@dataclass(frozen=True)
class Source:
    """A table, narrowed to one kline interval when the user asked for `kline_<interval>`."""

    table: str
    interval: str | None = None

    @property
    def label(self) -> str:
        return f"{self.table} {self.interval}" if self.interval else self.table

    @property
    def kind(self) -> str:
        """The stream that fills this source, for messages that say how to record it."""
        if self.table == "klines":
            return f"kline_{self.interval or '1m'}"
        return next(kind for kind, table in KIND_TABLES.items() if table == self.table)

    def equals(self, symbol: str) -> dict[str, str]:
        """The column values that select this source's rows of `symbol`."""
        return {"symbol": symbol, **({"interval": self.interval} if self.interval else {})}

    def filters(self, symbol: str) -> list[ColumnElement[bool]]:
        table = TABLES[self.table]
        return [table.c[name] == value for name, value in self.equals(symbol).items()]

    def in_range(self, start_ms: int, end_ms: int) -> list[ColumnElement[bool]]:
        time_column = TABLES[self.table].c[TIME_COLUMNS[self.table]]
        return [time_column >= start_ms, time_column < end_ms]


def resolve_source(table_or_kind: str, interval: str | None = None) -> Source:
    """`"kline_1m"` -> klines of 1m, `"aggTrade"` or `"agg_trades"` -> agg_trades.

    Kinds and table names are accepted in any case; intervals only as Binance spells
    them, because "1m" is a minute and "1M" a month.
    """
    name = table_or_kind.strip()
    prefix, underscore, kind_interval = name.partition("_")
    if prefix.lower() == "kline" and underscore:
        return _klines_source(kind_interval, interval)
    table = _TABLE_NAMES.get(name.lower())
    if table is None:
        raise ValueError(f"unknown table or stream kind {table_or_kind!r}: use one of {_valid_names()}")
    if table == "klines":
        return _klines_source(interval, None)
    if interval is not None:
        raise ValueError(f"an interval only applies to klines, not to {table}: leave it out")
    return Source(table)


def _klines_source(interval: str | None, requested: str | None) -> Source:
    if interval and requested and interval != requested:
        raise ValueError(f"kline_{interval} and interval {requested!r} disagree: give the interval once")
    interval = interval or requested
    if interval is not None and interval not in KLINE_INTERVALS:
        raise ValueError(f"unknown kline interval {interval!r}: use one of {', '.join(KLINE_INTERVALS)}")
    return Source("klines", interval)


def _valid_names() -> str:
    return f"{valid_kinds_text(separator=' ')}, or a table name: {', '.join(TABLES)}"


def check_directory(path: Path) -> None:
    """Fail before reading any row, rather than after the query, on a mistyped path."""
    if not path.parent.is_dir():
        raise ValueError(
            f"cannot write {path}: the directory {path.parent} does not exist; create it or choose another path"
        )


def require_rows(
    conn: Connection, source: Source, symbol: str, start_ms: int, end_ms: int, archive_dir: Path | None = None
) -> None:
    """Raise a ValueError that says why there is nothing, before any file is created.
    With `archive_dir`, days that live in day files only count too."""
    if has_rows(conn, source, symbol, start_ms, end_ms):
        return
    if archive_dir is not None and dayfiles.archived_rows_exist(conn, source.table, symbol, start_ms, end_ms):
        return
    raise ValueError(no_rows_message(conn, source, symbol, start_ms, end_ms))


def has_rows(conn: Connection, source: Source, symbol: str, start_ms: int, end_ms: int) -> bool:
    filters = source.filters(symbol) + source.in_range(start_ms, end_ms)
    return _exists(conn, source.table, filters)


def no_rows_message(conn: Connection, source: Source, symbol: str, start_ms: int, end_ms: int) -> str:
    """Why `source` has no rows of `symbol` in the range, and what the user can ask instead."""
    table = TABLES[source.table]
    time_column = table.c[TIME_COLUMNS[source.table]]
    first, last = conn.execute(
        select(func.min(time_column), func.max(time_column)).where(*source.filters(symbol))
    ).one()
    if first is not None:
        return (
            f"no {source.label} rows for {symbol} from {iso_ms(start_ms)} to "
            f"{iso_ms(end_ms)} (end excluded): they run from {iso_ms(first)} to "
            f"{iso_ms(last)}; choose a range that overlaps that"
        )
    if _exists(conn, source.table, source.filters(symbol)):
        return f"no {source.label} rows for {symbol} have a {time_column.name}, so no time range selects them"
    return f"no {source.label} rows for {symbol}: {_what_the_table_holds(conn, source, symbol)}"


def _what_the_table_holds(conn: Connection, source: Source, symbol: str) -> str:
    table = TABLES[source.table]
    if source.interval:
        intervals = _distinct(conn, table.c.interval, [table.c.symbol == symbol])
        if intervals:
            return f"its klines have the interval(s) {', '.join(intervals)}: ask for one of those"
    symbols = _distinct(conn, table.c.symbol, [], limit=_MAX_SYMBOLS_SHOWN + 1)
    record = f"binance-recorder subscribe {symbol} --streams {source.kind}"
    if not symbols:
        return f"the {source.table} table is empty: record the {source.kind} stream first ({record})"
    shown = ", ".join(symbols[:_MAX_SYMBOLS_SHOWN])
    more = " and more" if len(symbols) > _MAX_SYMBOLS_SHOWN else ""
    return f"the {source.table} table holds {shown}{more}; check the symbol, or record it first ({record})"


def _distinct(conn: Connection, column: Any, filters: list[ColumnElement[bool]], limit: int = 100) -> list[str]:
    """Distinct values of a leading key column, one index seek each.

    A DISTINCT would read the whole key index, every row of every symbol, only to word
    an error message; seeking to the next larger value reads a few pages per value.
    """
    values: list[str] = []
    while len(values) < limit:
        after = [column > values[-1]] if values else []
        value = conn.scalar(select(column).where(*filters, *after).order_by(column).limit(1))
        if value is None:
            break
        values.append(value)
    return values


def _exists(conn: Connection, table_name: str, filters: list[ColumnElement[bool]]) -> bool:
    statement = select(literal(1)).select_from(TABLES[table_name]).where(*filters).limit(1)
    return conn.execute(statement).first() is not None


def export_rows(
    engine: Engine,
    table_or_kind: str,
    symbol: str,
    start_ms: int,
    end_ms: int,
    path: str | Path,
    fmt: str = "csv",
    interval: str | None = None,
    progress: Progress | None = None,
    chunk_rows: int = CHUNK_ROWS,
    archive_dir: Path | None = None,
) -> int:
    """Write `symbol`'s rows with start_ms <= time < end_ms to `path`; return the row count.

    The columns are the table's, in `TABLE_COLUMNS` order, with times in milliseconds as
    stored. `progress(rows_so_far)` is called after each chunk written. With
    `archive_dir` (ARCHIVE_DIR), days deleted from the database come from their day
    files (worker/store/dayfiles.py), the same rows in the same order.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    source = resolve_source(table_or_kind, interval)
    symbol = symbol.strip().upper()
    check_range(start_ms, end_ms)
    target = Path(path)
    check_directory(target)
    partial = target.with_name(target.name + ".partial")
    with engine.connect() as conn:
        require_rows(conn, source, symbol, start_ms, end_ms, archive_dir)
    chunks = source_chunks(engine, archive_dir, source, symbol, start_ms, end_ms, chunk_rows)
    writer = _write_csv if fmt == "csv" else _write_parquet
    try:
        written = writer(partial, TABLES[source.table], _reporting(chunks, progress))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return written


def source_chunks(
    engine: Engine,
    archive_dir: Path | None,
    source: Source,
    symbol: str,
    start_ms: int,
    end_ms: int,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[Sequence[Any]]:
    """The source's rows of `symbol` in the window, a chunk at a time, in time order,
    then the key (rows of the same millisecond come out the same way in every export),
    from the database and, with `archive_dir`, the day files."""
    table = TABLES[source.table]
    return dayfiles.read_rows(engine, archive_dir, table, source.equals(symbol), start_ms, end_ms, chunk_rows)


def _reporting(chunks: Iterator[Sequence[Any]], progress: Progress | None) -> Iterator[Sequence[Any]]:
    """Pass the chunks through, and report the rows so far once each has been written
    (the writers ask for the next chunk only after writing the previous one)."""
    rows = 0
    for chunk in chunks:
        yield chunk
        rows += len(chunk)
        if progress is not None:
            progress(rows)


def _write_csv(path: Path, table: Table, chunks: Iterator[Sequence[Any]]) -> int:
    """A header of column names, then rows as Python writes them: floats in their
    shortest exact form, booleans as True/False, NULL as an empty field."""
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(TABLE_COLUMNS[table.name])
        for chunk in chunks:
            writer.writerows(chunk)
            rows += len(chunk)
    return rows


def _write_parquet(path: Path, table: Table, chunks: Iterator[Sequence[Any]]) -> int:
    return dayfiles.write_parquet(path, table, chunks)
