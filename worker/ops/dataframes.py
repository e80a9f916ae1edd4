"""Recorded rows as a DataFrame for analysis, over the database and the day files together.

    from worker.ops.dataframes import load

    trades = load("trade", "BTCUSDT", "2026-11-24", "2026-11-26")  # pandas
    marks = load("markPrice", "BTCUSDT", "-1d", "now", market="usdm")  # usdm_mark_prices
    candles = load("kline_1m", "ETHUSDT", "-7d", "now")
    book = Selection("depth", "BTCUSDT", "-1h", "now").polars()  # where polars is installed

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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.ops.clients import existing_database
from worker.ops.export import resolve_source, source_chunks
from worker.settings import get_settings
from worker.store.dayfiles import parquet_schema, record_batch
from worker.store.storage import TABLES
from worker.streams import SPOT
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
    market: str = SPOT,
) -> pd.DataFrame:
    """`symbol`'s rows of a stream kind ("trade", "aggTrade", "kline_1m", "depth", ...) or
    table ("trades", "usdm_mark_prices", ...) with start <= time < end, as pandas; a
    kind of `market` (spot, usdm, coinm) reads that market's table.

    Integer columns (ids, counts, ms times) are pandas' nullable `Int64`, so a NULL
    (`event_time` of a REST-backfilled row) is `<NA>` rather than turning the whole
    column into floats. Convert a time column with
    `pd.to_datetime(frame.trade_time, unit="ms", utc=True)`. For polars:
    `Selection(...).polars()`, with the same arguments.
    """
    return Selection(kind_or_table, symbol, start, end, interval, database_url, archive_dir, market).pandas()


@dataclass(frozen=True)
class Selection:
    """The rows `load` reads, to have them as pandas, polars or Arrow."""

    kind_or_table: str
    symbol: str
    start: Instant
    end: Instant
    interval: str | None = None
    database_url: str | None = None
    archive_dir: str | Path | None = None
    market: str = SPOT

    def pandas(self) -> pd.DataFrame:
        import pandas as pd
        import pyarrow as pa

        return self.arrow().to_pandas(
            types_mapper=lambda arrow_type: pd.Int64Dtype() if arrow_type == pa.int64() else None
        )

    def polars(self) -> pl.DataFrame:
        """polars is not a dependency: install it to use this."""
        try:
            import polars
        except ImportError:
            raise ImportError("Selection.polars needs polars: pip install polars (or use load for pandas)") from None
        frame = polars.from_arrow(self.arrow())
        assert isinstance(frame, polars.DataFrame)  # a Table gives a DataFrame, a lone array a Series
        return frame

    def arrow(self) -> pa.Table:
        """One Arrow table, the common ground of pandas, polars and DuckDB."""
        import pyarrow as pa

        source = resolve_source(self.kind_or_table, self.interval, self.market)
        start_ms, end_ms = _ms(self.start), _ms(self.end)
        check_range(start_ms, end_ms)
        settings = get_settings()
        if self.database_url is not None:  # ARCHIVE_DIR's default follows the database's folder
            settings = dataclasses.replace(settings, database_url=self.database_url)
        archive = Path(self.archive_dir) if self.archive_dir is not None else settings.archive_path
        engine = existing_database(settings)
        try:
            schema = parquet_schema(TABLES[source.table])
            chunks = source_chunks(engine, archive, source, self.symbol.strip().upper(), start_ms, end_ms)
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
