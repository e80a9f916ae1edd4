"""Day files: every closed UTC day of every table as Parquet (zstd), so months of data
cost a fraction of the database's disk and pandas, polars and DuckDB read them directly.

Layout, Hive-style (DuckDB and pyarrow read `table` and `date` as columns of the folder):

    <ARCHIVE_DIR>/table=<table>/date=<YYYY-MM-DD>/symbol=<SYMBOL>.parquet

one file per table, day and symbol (the pair, for the futures tables keyed by pair),
rows in the order `export` writes them: time, then the rest of the key.

The archiver (`archive_days`, run by the beat task in tasks/archive.py) writes a day
once it is closed: before today (UTC) and either the table holds a row timed after it
(the drain has stored past it) or a whole day has gone by since it ended. Each file is
written under a temporary name, its rows re-read and checked against the database's
count, then renamed: a crash mid-write leaves at most a `.partial` file that nothing
reads. What was written goes to the `archived_days` table (worker/store/storage.py),
including how many rows of that day the database held (`db_rows`).

Late rows. Every run counts each closed day still in the database; a day whose count
differs from the `db_rows` last recorded has changed (a late frame, a backfill, or
retention deleted some of it). Its changed symbols are rewritten from the union of the
file and the database (keys stored twice once, the database's version kept), so a file
never loses a row, and `db_rows` is brought up to date. Retention deletes only whole days
whose count still equals `db_rows` (`archived_cutoff`), so a row the archiver has not
seen is never deleted. A day where late rows and deletions cancel out exactly between
two archiver runs would go unnoticed; that needs both at once within the hour.

Reading (`read_rows`, `readable`): for each day of a window the database is used when
it holds as many rows of the symbol's day as the file, the file when the database has
none, and the union of both (through a scratch SQLite file) otherwise; so `export`,
`book` and `worker.ops.dataframes` do not care where a day lives.

This module knows tables, SQL and files, nothing about Redis or Celery.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    Select,
    String,
    Table,
    and_,
    create_engine,
    delete,
    func,
    insert,
    select,
)

from worker import times
from worker.store.partitions import DAY_MS, day_start
from worker.store.storage import TABLES, TIME_COLUMNS, archived_days, store_rows

if TYPE_CHECKING:
    import pyarrow as pa

CLOSE_AFTER_MS = DAY_MS
"""A day the drain has not stored past (its table got no later row) is closed anyway
this long after it ended: whatever frames of it were buffered are stored by then."""

COMPRESSION = "zstd"
CHUNK_ROWS = 20_000


# -- layout and order --------------------------------------------------------------------


def day_text(day_ms: int) -> str:
    return times.utc_datetime(day_ms).strftime("%Y-%m-%d")


def relative_path(table: str, day_ms: int, subject: str) -> str:
    return f"table={table}/date={day_text(day_ms)}/symbol={subject}.parquet"


def subject_column(table: Table) -> Column[Any]:
    """`symbol`, or `pair` for the futures tables keyed by pair: the first key column."""
    return next(iter(table.primary_key.columns))


def time_order(table: Table) -> list[Column[Any]]:
    """Time, then the rest of the key: rows of one millisecond in the same order every time."""
    time_column = table.c[TIME_COLUMNS[table.name]]
    return [time_column, *(column for column in table.primary_key.columns if column is not time_column)]


def _in_window(table: Table, subject: str, start_ms: int, end_ms: int) -> list[ColumnElement[bool]]:
    time_column = table.c[TIME_COLUMNS[table.name]]
    return [subject_column(table) == subject, time_column >= start_ms, time_column < end_ms]


# -- Parquet -----------------------------------------------------------------------------


def parquet_schema(table: Table) -> pa.Schema:
    """The Arrow schema of a table: int64 ids and ms times, float64 prices, string
    symbols, bool flags; nullable where the column is.

    pyarrow is imported in the functions that use it, not at the top of the module, so
    that the CLI's other commands do not pay for loading it.
    """
    import pyarrow as pa

    return pa.schema(
        [pa.field(column.name, _arrow_type(column.type), nullable=column.nullable) for column in table.columns]
    )


def _arrow_type(sql_type: Any) -> pa.DataType:
    import pyarrow as pa

    for sql_class, arrow_type in (
        (Boolean, pa.bool_()),
        (Integer, pa.int64()),  # BigInteger too, its subclass
        (Float, pa.float64()),
        (String, pa.string()),
        (LargeBinary, pa.binary()),  # packed book levels (worker/store/depth.py)
    ):
        if isinstance(sql_type, sql_class):
            return arrow_type
    raise TypeError(f"no Parquet type for the SQL type {sql_type!r}: add it to _arrow_type")


def record_batch(schema: pa.Schema, chunk: Sequence[Sequence[Any]]) -> pa.RecordBatch:
    """Rows (tuples in the table's column order) -> one Arrow batch of `schema`."""
    import pyarrow as pa

    columns = zip(*chunk, strict=False)
    arrays = [pa.array(values, type=f.type) for values, f in zip(columns, schema, strict=False)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def write_parquet(path: Path, table: Table, chunks: Iterator[Sequence[Any]], compression: str = "snappy") -> int:
    """One row group per chunk, all with the schema of the table, so the file's types do
    not depend on the values of its first rows."""
    import pyarrow.parquet as pq

    schema = parquet_schema(table)
    rows = 0
    with pq.ParquetWriter(path, schema, compression=compression) as writer:
        for chunk in chunks:
            writer.write_batch(record_batch(schema, chunk))
            rows += len(chunk)
    return rows


def file_chunks(
    path: Path, table: Table, start_ms: int, end_ms: int, equals: Mapping[str, Any], chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[tuple[Any, ...]]]:
    """A day file's rows with start_ms <= time < end_ms and the `equals` column values,
    as tuples in the table's column order, in the file's (time) order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    time_name = TIME_COLUMNS[table.name]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
        mask = pc.and_(pc.greater_equal(batch[time_name], start_ms), pc.less(batch[time_name], end_ms))
        for name, value in equals.items():
            mask = pc.and_(mask, pc.equal(batch[name], value))
        kept = batch.filter(mask)
        if kept.num_rows:
            yield list(zip(*(column.to_pylist() for column in kept.columns), strict=True))


# -- the archiver ------------------------------------------------------------------------


@dataclass
class ArchiveRun:
    """What one run did: files written (`table/date/symbol` -> rows), the days it
    found unchanged, files refused because the database changed while they were
    written (the next run writes them), and whether `keep_going` stopped it."""

    written: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    unchanged_days: int = 0
    refused: list[str] = field(default_factory=list)
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def archive_days(
    engine: Engine, archive_dir: Path, now_ms: int, keep_going: Callable[[], bool] = lambda: True
) -> ArchiveRun:
    """Write every closed day of every table that is not in its day files yet, or has
    changed since; `keep_going` is asked after each day (the task renews its lock)."""
    run = ArchiveRun()
    for name in TIME_COLUMNS:
        with engine.connect() as conn:
            days = closed_days(conn, TABLES[name], now_ms)
        for day in days:
            _archive_day(engine, archive_dir, TABLES[name], day, run)
            run.interrupted = not keep_going()
            if run.interrupted:
                return run
    return run


def closed_days(conn: Connection, table: Table, now_ms: int) -> list[int]:
    """Starts of the table's closed days that still have rows in the database."""
    time_column = table.c[TIME_COLUMNS[table.name]]
    first, newest = conn.execute(select(func.min(time_column), func.max(time_column))).one()
    if first is None:
        return []
    days: list[int] = []
    day = day_start(first)
    while day + DAY_MS <= day_start(now_ms) and (day + DAY_MS <= newest or day + DAY_MS + CLOSE_AFTER_MS <= now_ms):
        days.append(day)
        day += DAY_MS
    return days


def _day_count(conn: Connection, table: Table, day: int, subject: str | None = None) -> int:
    time_column = table.c[TIME_COLUMNS[table.name]]
    conditions = [time_column >= day, time_column < day + DAY_MS]
    if subject is not None:
        conditions.append(subject_column(table) == subject)
    return int(conn.scalar(select(func.count()).select_from(table).where(*conditions)) or 0)


def _records(conn: Connection, table: str, day: int) -> dict[str, Any]:
    found = conn.execute(
        select(archived_days).where(archived_days.c.table_name == table, archived_days.c.day == day_text(day))
    )
    return {row.symbol: row for row in found}


def _archive_day(engine: Engine, archive_dir: Path, table: Table, day: int, run: ArchiveRun) -> None:
    with engine.connect() as conn:
        total = _day_count(conn, table, day)
        records = _records(conn, table.name, day)
        if total == sum(record.db_rows for record in records.values()):
            run.unchanged_days += 1
            return
        subject = subject_column(table)
        time_column = table.c[TIME_COLUMNS[table.name]]
        counts: dict[str, int] = dict(
            conn.execute(
                select(subject, func.count()).where(time_column >= day, time_column < day + DAY_MS).group_by(subject)
            ).all()
        )
    for value in sorted(set(counts) | set(records)):
        db_rows, record = counts.get(value, 0), records.get(value)
        if record is not None and record.db_rows == db_rows:
            continue
        if record is not None and db_rows == 0:  # deleted from the database: its file keeps the rows
            _record(engine, table.name, day, value, record.rows, 0, record.bytes, record.path)
            continue
        _write_day(engine, archive_dir, table, day, value, db_rows, record is not None, run)


def _write_day(
    engine: Engine, archive_dir: Path, table: Table, day: int, subject: str, db_rows: int, merge: bool, run: ArchiveRun
) -> None:
    """Write one file; with `merge`, of the union of its old rows and the database's."""
    relative = relative_path(table.name, day, subject)
    target = archive_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")  # one writer at a time: the task's lock
    merged = merge and target.exists()
    try:
        if merged:
            with overlay(engine, archive_dir, [table.name], subject, day, day + DAY_MS) as scratch:
                written, in_source = _write_from(scratch, table, day, subject, partial)
        else:
            written, in_source = _write_from(engine, table, day, subject, partial)
        # Straight from the database, also the count the archiver decided on: a row that
        # came since would be recorded as seen without being in the file.
        agreed = written == in_source and (merged or written == db_rows)
        if not agreed or _rows_in_file(partial, table) != written:
            partial.unlink()
            run.refused.append(relative)
            return
        _replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    size = target.stat().st_size
    _record(engine, table.name, day, subject, written, db_rows, size, relative)
    run.written[relative] = written
    run.bytes += size


def _write_from(source: Engine, table: Table, day: int, subject: str, path: Path) -> tuple[int, int]:
    """(rows written, rows the source holds of that day): equal unless it changed meanwhile."""
    statement = select(table).where(*_in_window(table, subject, day, day + DAY_MS)).order_by(*time_order(table))
    with source.connect() as conn:
        written = write_parquet(path, table, db_chunks(conn, statement), compression=COMPRESSION)
        return written, _day_count(conn, table, day, subject)


def _rows_in_file(path: Path, table: Table) -> int:
    """Read the written file back (its key columns, every page of them decoded)."""
    import pyarrow.parquet as pq

    keys = [column.name for column in table.primary_key.columns]
    return int(pq.read_table(path, columns=keys).num_rows)


def _replace(partial: Path, target: Path) -> None:
    """Flush the file to disk before it takes its name, so a crash never leaves a
    named file with missing pages; then the folder's entry."""
    with partial.open("rb") as file:
        os.fsync(file.fileno())
    partial.replace(target)
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _record(engine: Engine, table: str, day: int, subject: str, rows: int, db_rows: int, size: int, path: str) -> None:
    key = and_(
        archived_days.c.table_name == table, archived_days.c.day == day_text(day), archived_days.c.symbol == subject
    )
    values = {"table_name": table, "day": day_text(day), "symbol": subject, "rows": rows, "db_rows": db_rows}
    with engine.begin() as conn:
        conn.execute(delete(archived_days).where(key))
        conn.execute(insert(archived_days).values(**values, bytes=size, path=path, written_at=times.now_ms()))


def db_chunks(
    conn: Connection, statement: Select[Any], chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[tuple[Any, ...]]]:
    """`yield_per` asks for a server-side cursor (PostgreSQL) and fetchmany-sized
    partitions (SQLite's cursor steps through the result lazily by itself)."""
    result = conn.execution_options(yield_per=chunk_rows).execute(statement)
    for partition in result.partitions():
        yield [tuple(row) for row in partition]


# -- retention ---------------------------------------------------------------------------


def archived_cutoff(engine: Engine, table: str, cutoff: int) -> int:
    """The latest time, at most `cutoff` and at a day's start, before which every day
    of `table` still in the database is archived and unchanged since: what retention
    may delete when it requires day files."""
    time_column = TABLES[table].c[TIME_COLUMNS[table]]
    with engine.connect() as conn:
        first = conn.scalar(select(func.min(time_column)))
        if first is None:
            return day_start(cutoff)
        day = day_start(first)
        while day < day_start(cutoff):
            total = _day_count(conn, TABLES[table], day)
            records = _records(conn, table, day)
            if total and (not records or total != sum(record.db_rows for record in records.values())):
                return day
            day += DAY_MS
    return day_start(cutoff)


# -- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A stretch of a window read one way: `db`, `file` (the day's file) or `both`."""

    start: int
    end: int
    source: str
    day: int = 0
    path: Path | None = None


def read_plan(
    conn: Connection, archive_dir: Path, table: Table, subject: str, start_ms: int, end_ms: int
) -> list[Segment]:
    """Where each day of [start_ms, end_ms) comes from, consecutive database days merged."""
    days = range(day_start(start_ms), end_ms, DAY_MS)
    recorded = {
        row.day: row
        for row in conn.execute(
            select(archived_days).where(
                archived_days.c.table_name == table.name,
                archived_days.c.symbol == subject,
                archived_days.c.day.in_([day_text(day) for day in days]),
            )
        )
    }
    segments: list[Segment] = []
    for day in days:
        low, high = max(day, start_ms), min(day + DAY_MS, end_ms)
        source, path = "db", None
        record = recorded.get(day_text(day))
        if record is not None and (archive_dir / record.path).exists():
            in_db = _day_count(conn, table, day, subject)
            if in_db != record.rows:
                source, path = ("file" if in_db == 0 else "both"), archive_dir / record.path
        if source == "db" and segments and segments[-1].source == "db":
            segments[-1] = Segment(segments[-1].start, high, "db")
        else:
            segments.append(Segment(low, high, source, day, path))
    return segments


def read_rows(
    engine: Engine,
    archive_dir: Path | None,
    table: Table,
    equals: Mapping[str, Any],
    start_ms: int,
    end_ms: int,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[list[tuple[Any, ...]]]:
    """Chunks of the rows with start_ms <= time < end_ms whose columns have the `equals`
    values (its subject, `symbol` or `pair`, among them), in time order, from the
    database and the day files (None: the database only)."""
    subject = equals[subject_column(table).name]
    conditions = [table.c[name] == value for name, value in equals.items()]

    def statement(low: int, high: int) -> Select[Any]:
        time_column = table.c[TIME_COLUMNS[table.name]]
        window = [time_column >= low, time_column < high]
        return select(table).where(*conditions, *window).order_by(*time_order(table))

    if archive_dir is None:
        segments = [Segment(start_ms, end_ms, "db")]
    else:
        with engine.connect() as conn:
            segments = read_plan(conn, archive_dir, table, subject, start_ms, end_ms)
    for segment in segments:
        if segment.source == "file" and segment.path is not None:
            yield from file_chunks(segment.path, table, segment.start, segment.end, equals, chunk_rows)
            continue
        with _segment_source(engine, archive_dir, table, subject, segment) as source, source.connect() as conn:
            yield from db_chunks(conn, statement(segment.start, segment.end), chunk_rows)


@contextmanager
def _segment_source(
    engine: Engine, archive_dir: Path | None, table: Table, subject: str, segment: Segment
) -> Iterator[Engine]:
    if segment.source == "both" and archive_dir is not None:
        with overlay(engine, archive_dir, [table.name], subject, segment.day, segment.day + DAY_MS) as scratch:
            yield scratch
    else:
        yield engine


def archived_rows_exist(conn: Connection, table: str, subject: str, start_ms: int, end_ms: int) -> bool:
    """Whether a day file of `subject` covers a day that overlaps the window."""
    days = [day_text(day) for day in range(day_start(start_ms), end_ms, DAY_MS)]
    found = conn.execute(
        select(archived_days.c.rows).where(
            archived_days.c.table_name == table,
            archived_days.c.symbol == subject,
            archived_days.c.day.in_(days),
            archived_days.c.rows > 0,
        )
    ).first()
    return found is not None


@contextmanager
def readable(
    engine: Engine, archive_dir: Path | None, tables: Sequence[str], subject: str, start_ms: int, end_ms: int
) -> Iterator[Engine]:
    """An engine whose `tables` hold every row of `subject` in [start_ms, end_ms): the
    database itself when it has them all, else a scratch copy of the window from the
    database and the day files. For readers that run their own queries (`book`)."""
    if archive_dir is not None:
        with engine.connect() as conn:
            plans = [read_plan(conn, archive_dir, TABLES[name], subject, start_ms, end_ms) for name in tables]
        if any(segment.source != "db" for plan in plans for segment in plan):
            with overlay(engine, archive_dir, tables, subject, day_start(start_ms), end_ms) as scratch:
                yield scratch
                return
    yield engine


@contextmanager
def overlay(
    engine: Engine, archive_dir: Path, tables: Sequence[str], subject: str, start_ms: int, end_ms: int
) -> Iterator[Engine]:
    """A scratch SQLite file holding `subject`'s rows of `tables` in [start_ms, end_ms)
    from the database, then those of the day files whose keys it lacks (the database's
    version of a row wins). A file, not memory: a day of a busy symbol is millions of rows."""
    with tempfile.TemporaryDirectory(prefix="dayfiles-") as folder:
        scratch = create_engine(f"sqlite:///{folder}/overlay.db")
        try:
            for name in tables:
                _fill(scratch, engine, archive_dir, TABLES[name], subject, start_ms, end_ms)
            yield scratch
        finally:
            scratch.dispose()


def _fill(scratch: Engine, engine: Engine, archive_dir: Path, table: Table, subject: str, start: int, end: int) -> None:
    table.create(scratch)
    with engine.connect() as conn:
        statement = select(table).where(*_in_window(table, subject, start, end))
        for chunk in db_chunks(conn, statement):
            with scratch.begin() as target:
                store_rows(target, {table.name: chunk})
        paths = conn.scalars(
            select(archived_days.c.path).where(
                archived_days.c.table_name == table.name,
                archived_days.c.symbol == subject,
                archived_days.c.day.in_([day_text(day) for day in range(day_start(start), end, DAY_MS)]),
            )
        ).all()
    subject_name = subject_column(table).name
    for path in paths:
        if (archive_dir / path).exists():
            for chunk in file_chunks(archive_dir / path, table, start, end, {subject_name: subject}):
                with scratch.begin() as target:
                    store_rows(target, {table.name: chunk})
