"""Recorded rows as a DataFrame for analysis, over the database and the day files together.

    from worker.ops.dataframes import load

    trades = load("trade", "BTCUSDT", "2026-11-24", "2026-11-26")  # pandas
    candles = load("kline_1m", "ETHUSDT", "-7d", "now")
    book = load_polars("depth", "BTCUSDT", "-1h", "now")  # polars, where installed

A day that retention has deleted from the database comes from its day file
(worker/store/dayfiles.py), the same rows `export` writes: the table's columns in its
order, times in milliseconds since the epoch as stored, one symbol, start included and
end excluded, ordered by time and then key. The types are the Parquet export's (int64
ids and times, float64 prices, bool flags; nullable columns hold None/NaN where NULL).

The database and the day folder are DATABASE_URL and ARCHIVE_DIR by default (the same
settings the service reads); give `database_url` and `archive_dir` to read another copy.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.ops.clients import existing_database
from worker.ops.export import resolve_source, source_chunks
from worker.settings import get_settings
from worker.store.dayfiles import parquet_schema, record_batch
from worker.store.storage import TABLES
from worker.times import check_range, parse_time

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

Instant = int | str | datetime
"""ms since the epoch, what the command line accepts ("2026-11-24", "-2h", "now"), or a
datetime (naive ones are UTC)."""


def load(
    kind_or_table: str,
    symbol: str,
    start: Instant,
    end: Instant,
    *,
    interval: str | None = None,
    database_url: str | None = None,
    archive_dir: str | Path | None = None,
) -> pd.DataFrame:
    """`symbol`'s rows of a stream kind ("trade", "aggTrade", "kline_1m", "depth", ...) or
    table ("trades", "usdm_mark_prices", ...) with start <= time < end, as pandas.

    Convert a time column with `pd.to_datetime(frame.trade_time, unit="ms", utc=True)`.
    """
    return arrow_table(
        kind_or_table, symbol, start, end, interval=interval, database_url=database_url, archive_dir=archive_dir
    ).to_pandas()


def load_polars(
    kind_or_table: str,
    symbol: str,
    start: Instant,
    end: Instant,
    *,
    interval: str | None = None,
    database_url: str | None = None,
    archive_dir: str | Path | None = None,
) -> pl.DataFrame:
    """The same rows as `load`, as a polars DataFrame; polars is not a dependency."""
    try:
        import polars
    except ImportError:
        raise ImportError("load_polars needs polars: pip install polars (or use load for pandas)") from None
    table = arrow_table(
        kind_or_table, symbol, start, end, interval=interval, database_url=database_url, archive_dir=archive_dir
    )
    frame = polars.from_arrow(table)
    assert isinstance(frame, polars.DataFrame)  # a Table gives a DataFrame, a lone array a Series
    return frame


def arrow_table(
    kind_or_table: str,
    symbol: str,
    start: Instant,
    end: Instant,
    *,
    interval: str | None = None,
    database_url: str | None = None,
    archive_dir: str | Path | None = None,
) -> pa.Table:
    """The rows as one Arrow table, the common ground of pandas, polars and DuckDB."""
    import pyarrow as pa

    source = resolve_source(kind_or_table, interval)
    start_ms, end_ms = _ms(start), _ms(end)
    check_range(start_ms, end_ms)
    settings = get_settings()
    if database_url is not None:  # ARCHIVE_DIR's default follows the database's folder
        settings = dataclasses.replace(settings, database_url=database_url)
    archive = Path(archive_dir) if archive_dir is not None else settings.archive_path
    engine = existing_database(settings)
    try:
        schema = parquet_schema(TABLES[source.table])
        chunks = source_chunks(engine, archive, source, symbol.strip().upper(), start_ms, end_ms)
        return pa.Table.from_batches([record_batch(schema, chunk) for chunk in chunks], schema=schema)
    finally:
        engine.dispose()


def _ms(instant: Any) -> int:
    if isinstance(instant, datetime):
        aware = instant if instant.tzinfo is not None else instant.replace(tzinfo=UTC)
        return int(aware.timestamp() * 1000)
    if isinstance(instant, int):
        return instant
    return parse_time(str(instant))
