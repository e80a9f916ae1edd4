"""`export SYMBOL book`: a rebuilt book every step, to CSV or Parquet, streaming.

One row per step at which the book is known (see `worker.ops.book.book_steps`):
`time`, `update_id`, then `bid_price_1`, `bid_qty_1`, ... `bid_price_N`, `bid_qty_N`,
`ask_price_1`, ... (level 1 is the best); a level the book does not have is empty.
Rows are written as they are rebuilt, so an export of days needs no more memory than
one book; the file gets its name only once complete, as every export does.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from worker.ops.book import book_steps
from worker.ops.export import FORMATS, check_directory
from worker.streams import SPOT
from worker.times import check_range

ROWS_PER_WRITE = 10_000


def book_columns(levels: int) -> list[str]:
    sides = [
        f"{side}_{field}_{level}"
        for side in ("bid", "ask")
        for level in range(1, levels + 1)
        for field in ("price", "qty")
    ]
    return ["time", "update_id", *sides]


def _flat_rows(
    engine: Engine, symbol: str, window: tuple[int, int, int], levels: int, archive_dir: Path | None, market: str
) -> Iterator[list[Any]]:
    padding: list[Any] = [None, None]
    start, end, step = window
    for at, update_id, bids, asks in book_steps(engine, symbol, start, end, step, levels, archive_dir, market):
        row: list[Any] = [at, update_id]
        for side in (bids, asks):
            for price, qty in side:
                row += (price, qty)
            row += padding * (levels - len(side))
        yield row


def export_book(
    engine: Engine,
    symbol: str,
    start_ms: int,
    end_ms: int,
    step_ms: int,
    levels: int,
    path: str | Path,
    fmt: str = "csv",
    progress: Callable[[int], None] | None = None,
    archive_dir: Path | None = None,
    market: str = SPOT,
) -> int:
    """Write the book of `symbol` in `market` every `step_ms` in [start_ms, end_ms) to
    `path`; returns the rows. With `archive_dir` (ARCHIVE_DIR), days deleted from the
    database come from the day files."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if levels < 1:
        raise ValueError(f"--levels {levels}: give at least 1 level per side")
    check_range(start_ms, end_ms)
    target = Path(path)
    check_directory(target)
    partial = target.with_name(target.name + ".partial")
    columns = book_columns(levels)
    rows = _flat_rows(engine, symbol, (start_ms, end_ms, step_ms), levels, archive_dir, market)
    writer = _write_csv if fmt == "csv" else _write_parquet
    try:
        written = writer(partial, columns, rows, progress or (lambda _: None))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return written


def _batches(rows: Iterator[list[Any]]) -> Iterator[list[list[Any]]]:
    batch: list[list[Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == ROWS_PER_WRITE:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_csv(path: Path, columns: list[str], rows: Iterator[list[Any]], progress: Callable[[int], None]) -> int:
    written = 0
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for batch in _batches(rows):
            writer.writerows(batch)
            written += len(batch)
            progress(written)
    return written


def _write_parquet(path: Path, columns: list[str], rows: Iterator[list[Any]], progress: Callable[[int], None]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [pa.field("time", pa.int64(), nullable=False), pa.field("update_id", pa.int64(), nullable=False)]
        + [pa.field(name, pa.float64()) for name in columns[2:]]
    )
    written = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in _batches(rows):
            arrays = [
                pa.array(values, type=field.type)
                for values, field in zip(zip(*batch, strict=True), schema, strict=True)
            ]
            writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
            written += len(batch)
            progress(written)
    return written
