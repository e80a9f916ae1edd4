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
from typing import Any

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
from worker.streams import (
    FUTURES_MARKETS,
    KLINE_KINDS,
    MARKETS,
    SPOT,
    Market,
    kind_table,
    market_named,
)
from worker.times import check_range, iso_ms

CHUNK_ROWS = 20_000
"""Rows fetched and written at a time. Measured on 300k trades: an export's peak Python
memory is about 16 MB at 20k rows (two chunks are alive while the next one is fetched),
42 MB at 50k, against 140 MB for the whole result, and it runs as fast."""

FORMATS = ("csv", "parquet")

REST_KINDS: dict[str, str] = {"openInterest": "open_interest", "fundingRate": "funding_rates"}
"""Futures data polled or backfilled from REST, not streamed: the name a user exports
it by -> its table (without the market's prefix)."""

LOSSY_TABLES: dict[str, str] = {
    "liquidations": "a sample, not every liquidation: Binance streams at most one per symbol per second",
}
"""Tables (without the market's prefix) whose rows are fewer than what happened, by
Binance's design -> what an export of them says so."""


def _kind_tables(market: Market) -> dict[str, str]:
    """The exportable kinds of `market` -> their base table: kinds and REST data whose
    table has a `symbol` column (pair-keyed tables such as continuous klines have none)."""
    kinds = {kind: kind_table(kind) for kind in market.kinds}
    if market.futures:
        kinds |= REST_KINDS
    return {kind: table for kind, table in kinds.items() if "symbol" in TABLES[market.table_prefix + table].c}


def _market_tables(market: Market) -> dict[str, str]:
    """`market`'s tables that hold rows of a symbol over time, full name -> base name."""
    futures = tuple(m.table_prefix for m in FUTURES_MARKETS)
    return {
        name: name.removeprefix(market.table_prefix)
        for name, table in TABLES.items()
        if (name.startswith(market.table_prefix) if market.futures else not name.startswith(futures))
        and "symbol" in table.c
        and name in TIME_COLUMNS
    }


def _table_names(market: Market) -> dict[str, str]:
    """What a user may name a source by in `market`, lower-cased -> the base table: its
    kinds, its tables by full name and (for a futures market) without the prefix."""
    tables = _market_tables(market)
    kinds = {kind.lower(): table for kind, table in _kind_tables(market).items()}
    return {**kinds, **{base: base for base in tables.values()}, **tables}


_MAX_SYMBOLS_SHOWN = 10


Progress = Callable[[int], None]


@dataclass(frozen=True)
class Source:
    """A market's table, narrowed to one kline interval when the user asked for
    `kline_<interval>`. `base` is the table's name without the market's prefix, the
    same in every market (`agg_trades` is spot's, `usdm_agg_trades` USDⓈ-M's)."""

    base: str
    interval: str | None = None
    market: str = SPOT

    @property
    def table(self) -> str:
        return MARKETS[self.market].table_prefix + self.base

    @property
    def label(self) -> str:
        return f"{self.table} {self.interval}" if self.interval else self.table

    @property
    def lossy(self) -> str | None:
        """Why this source holds fewer rows than happened, when Binance designed it so."""
        return LOSSY_TABLES.get(self.base)

    @property
    def kind(self) -> str | None:
        """The stream or REST data that fills this source, for messages that say how to
        record it; None for a table no kind fills (gaps, listings...)."""
        kinds = _kind_tables(MARKETS[self.market])
        kind = next((kind for kind, base in kinds.items() if base == self.base), None)
        return f"{kind}_{self.interval or '1m'}" if kind in KLINE_KINDS else kind

    def record_command(self, symbol: str) -> str:
        """How to record this source: a subscription's stream; funding rates are
        backfilled, open interest polled for every subscribed futures symbol."""
        market = f" --market {self.market}" if self.market != SPOT else ""
        if self.kind == "fundingRate":
            return f"binance-recorder backfill {symbol} fundingRate{market}"
        streams = f" --streams {self.kind}" if self.kind and self.kind not in REST_KINDS else ""
        return f"binance-recorder subscribe {symbol}{market}{streams}"

    def equals(self, symbol: str) -> dict[str, str]:
        """The column values that select this source's rows of `symbol`."""
        return {"symbol": symbol, **({"interval": self.interval} if self.interval else {})}

    def filters(self, symbol: str) -> list[ColumnElement[bool]]:
        table = TABLES[self.table]
        return [table.c[name] == value for name, value in self.equals(symbol).items()]

    def in_range(self, start_ms: int, end_ms: int) -> list[ColumnElement[bool]]:
        time_column = TABLES[self.table].c[TIME_COLUMNS[self.table]]
        return [time_column >= start_ms, time_column < end_ms]


def resolve_source(table_or_kind: str, interval: str | None = None, market: str = SPOT) -> Source:
    """`"kline_1m"` -> klines of 1m, `"aggTrade"` or `"agg_trades"` -> agg_trades, in
    `market`'s tables (`market="usdm"`: usdm_klines, usdm_agg_trades).

    Kinds and table names are accepted in any case; intervals only as Binance spells
    them, because "1m" is a minute and "1M" a month.
    """
    name = table_or_kind.strip()
    spec = _market_of_table(name.lower(), market_named(market))
    names = _table_names(spec)
    prefix, underscore, kind_interval = name.rpartition("_") if "kline" in name.lower() else ("", "", "")
    if underscore and prefix.lower() in names and names[prefix.lower()].endswith("klines"):
        return _klines_source(names[prefix.lower()], kind_interval, interval, spec)
    table = names.get(name.lower())
    if table is None:
        raise ValueError(
            f"unknown table or stream kind {table_or_kind!r} in {spec.name}: use one of {_valid_names(spec)}"
            + _elsewhere(name, spec)
        )
    if table.endswith("klines"):
        return _klines_source(table, interval, None, spec)
    if interval is not None:
        raise ValueError(f"an interval only applies to klines, not to {spec.table_prefix + table}: leave it out")
    return Source(table, market=spec.name)


def _market_of_table(name: str, asked: Market) -> Market:
    """The market of what the user named: `asked`, whose kinds and tables (with or without
    the prefix) come first; else the market a full table name belongs to
    (`usdm_mark_prices` is USDⓈ-M's without --market, as it was before markets)."""
    if name in _table_names(asked):  # `agg_trades` in usdm is usdm_agg_trades
        return asked
    owner = next((market for market in MARKETS.values() if name in _market_tables(market)), None)
    if owner is None:
        return asked
    if asked.futures:
        raise ValueError(f"{name} is a table of {owner.name}, not {asked.name}: give --market {owner.name}")
    return owner


def _klines_source(base: str, interval: str | None, requested: str | None, market: Market) -> Source:
    if interval and requested and interval != requested:
        raise ValueError(f"{base}_{interval} and interval {requested!r} disagree: give the interval once")
    interval = interval or requested
    if interval is not None and interval not in market.kline_intervals:
        raise ValueError(f"unknown kline interval {interval!r}: use one of {', '.join(market.kline_intervals)}")
    return Source(base, interval, market.name)


def _elsewhere(name: str, asked: Market) -> str:
    """`; markPrice is a kind of usdm, coinm: add --market usdm` when another market has it."""
    others = [market.name for market in MARKETS.values() if market != asked and name.lower() in _table_names(market)]
    return f"; {name} is a kind of {', '.join(others)}: add --market {others[0]}" if others else ""


def _valid_names(market: Market) -> str:
    kinds = _kind_tables(market)
    named = (f"{kind}_<interval>" if kind in KLINE_KINDS else kind for kind in kinds)
    tables = (market.table_prefix + table for table in dict.fromkeys(kinds.values()))
    return f"{', '.join(named)}, or a table name: {', '.join(tables)}"


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
    if source.interval is not None:
        intervals = _distinct(conn, table.c.interval, [table.c.symbol == symbol])
        if intervals:
            return f"its klines have the interval(s) {', '.join(intervals)}: ask for one of those"
    symbols = _distinct(conn, table.c.symbol, [], limit=_MAX_SYMBOLS_SHOWN + 1)
    record = source.record_command(symbol)
    what = f"the {source.kind} stream" if source.kind and source.kind not in REST_KINDS else "it"
    if not symbols:
        return f"the {source.table} table is empty: record {what} first ({record})"
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
    market: str = SPOT,
) -> int:
    """Write `symbol`'s rows with start_ms <= time < end_ms to `path`; return the row count.

    The columns are the table's, in `TABLE_COLUMNS` order, with times in milliseconds as
    stored. `progress(rows_so_far)` is called after each chunk written. With
    `archive_dir` (ARCHIVE_DIR), days deleted from the database come from their day
    files (worker/store/dayfiles.py), the same rows in the same order.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    source = resolve_source(table_or_kind, interval, market)
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
