"""Retention: delete the rows that are older than their table's policy allows.

The drain writes every second and SQLite has one writer at a time, so a retention run
must never hold the write lock for long: it deletes in chunks of `RETENTION_CHUNK_ROWS`,
one short transaction each, and the drain's inserts slip in between the chunks. Rows
whose time is NULL (a `book_tickers` row drained without a clock mark) have no age and
are kept.

With RETENTION_REQUIRES_ARCHIVE (the default) only whole UTC days that the archiver has
written to day files (worker/store/dayfiles.py), and that have not changed since, are
deleted; the cutoffs of the run say up to where.

On PostgreSQL, a table created partitioned by day (worker/store/partitions.py) loses
its days that are entirely older than the cutoff with one `DROP TABLE` each; only the
partition holding the cutoff and the default partition are deleted from in chunks.
Tables of databases made by older versions are plain and keep the chunked deletes;
the run says per table which it used (`methods`).

This module knows tables and SQL, nothing about Redis or Celery: the task in
`tasks/retention.py` adds the lock and the schedule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import ColumnClause, Delete, Engine, Table, delete, exc, literal_column, select

from worker.settings import Settings
from worker.store import dayfiles, partitions
from worker.store.storage import TABLES, TIME_COLUMNS

DAY_MS = 86_400_000


@dataclass(frozen=True)
class RetentionPolicy:
    """How many days each table keeps (0: for ever), and the rows deleted per transaction.

    RETENTION_DAYS and RETENTION_CHUNK_ROWS are checked with the other settings'
    ranges (worker/settings.py); the overrides, a text of their own, here.
    """

    default_days: int
    overrides: Mapping[str, int]
    chunk_rows: int
    requires_archive: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(
            default_days=settings.retention_days,
            overrides=parse_overrides(settings.retention_overrides),
            chunk_rows=settings.retention_chunk_rows,
            requires_archive=settings.retention_requires_archive,
        )

    def days_for(self, table: str) -> int:
        return self.overrides.get(table, self.default_days)

    def cutoffs(self, now_ms: int) -> dict[str, int]:
        """Per table that has a limit: rows timed before this (ms since the epoch) go."""
        return {table: now_ms - days * DAY_MS for table in TIME_COLUMNS if (days := self.days_for(table)) > 0}


def parse_overrides(text: str) -> dict[str, int]:
    """`"tickers=7, book_tickers=2"` -> `{"tickers": 7, "book_tickers": 2}`.

    Checked against the table names here, because a misspelt table would otherwise be
    kept for the default time without anyone noticing.
    """
    overrides: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            table, days = _override(part)
        except ValueError as error:
            raise ValueError(f"RETENTION_OVERRIDES={text!r}: {error}") from None
        overrides[table] = days
    return overrides


def _override(part: str) -> tuple[str, int]:
    table, equals, days = (piece.strip() for piece in part.partition("="))
    if not equals:
        raise ValueError(f"{part!r} is not TABLE=DAYS")
    if table not in TIME_COLUMNS:
        raise ValueError(f"unknown table {table!r}; the tables are {', '.join(TIME_COLUMNS)}")
    if not days.isdigit():
        raise ValueError(f"{part!r}: days must be a whole number, 0 to keep the table for ever")
    return table, int(days)


@dataclass
class RetentionRun:
    """What one run did: the cutoffs it applied, rows deleted per table, chunks used;
    per table whether it dropped partitions or deleted in chunks only (`methods`), the
    partitions dropped and their rows (PostgreSQL's estimate: `reltuples`), and the
    partitions it could not drop this time (their lock was not granted in time)."""

    cutoffs: dict[str, int]
    deleted: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    interrupted: bool = False
    wal_truncated: bool | None = None
    methods: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    dropped_rows: dict[str, int] = field(default_factory=dict)
    not_dropped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def delete_expired_rows(
    engine: Engine,
    policy: RetentionPolicy,
    now_ms: int,
    keep_going: Callable[[], bool] = lambda: True,
) -> RetentionRun:
    """Delete every row older than its table's cutoff, a chunk per transaction.

    `keep_going` is asked after every chunk (the task renews its lock there); False
    stops the run, and the next run carries on where this one stopped. With
    `policy.requires_archive`, a table's cutoff is lowered to the start of its first
    day that is not in day files yet, or has changed since (`dayfiles.archived_cutoff`):
    whole archived days go, nothing else.
    """
    cutoffs = policy.cutoffs(now_ms)
    if policy.requires_archive:
        cutoffs = {table: dayfiles.archived_cutoff(engine, table, cutoff) for table, cutoff in cutoffs.items()}
    run = RetentionRun(cutoffs=cutoffs)
    with engine.connect() as conn:
        partitioned = set(partitions.partitioned_tables(conn))
    for table, cutoff in run.cutoffs.items():
        run.deleted[table] = 0
        if table in partitioned:
            run.methods[table] = "partitions"
            _expire_partitions(engine, table, cutoff, policy.chunk_rows, run, keep_going)
        else:
            run.methods[table] = "chunks"
            _delete_in_chunks(
                run,
                table,
                policy.chunk_rows,
                keep_going,
                functools.partial(_delete_chunk, engine, TABLES[table], cutoff, policy.chunk_rows),
            )
    if any(run.deleted.values()):
        run.wal_truncated = checkpoint_wal(engine)
    return run


def _delete_in_chunks(
    run: RetentionRun, table: str, chunk_rows: int, keep_going: Callable[[], bool], delete_chunk: Callable[[], int]
) -> None:
    while not run.interrupted:
        deleted = delete_chunk()
        run.deleted[table] += deleted
        run.chunks += 1
        run.interrupted = not keep_going()
        if deleted < chunk_rows:
            break


def _delete_chunk(engine: Engine, table: Table, cutoff: int, limit: int) -> int:
    if engine.dialect.name == "postgresql":
        return _delete_partition_chunk(engine, partitions.chunk_delete_sql(table.name, table.name, limit), cutoff)
    with engine.begin() as conn:
        return conn.execute(chunk_delete(conn.dialect.name, table, cutoff, limit)).rowcount


def _expire_partitions(
    engine: Engine, table: str, cutoff: int, chunk_rows: int, run: RetentionRun, keep_going: Callable[[], bool]
) -> None:
    """Drop the partitions entirely before `cutoff`; delete in chunks from the one that
    holds it and from the default partition."""
    with engine.connect() as conn:
        found = partitions.list_partitions(conn, table)
    for partition in found:
        if run.interrupted:
            return
        if partition.upper is not None and partition.upper <= cutoff:
            try:
                rows = partitions.drop_partition(engine, partition)
            except exc.DBAPIError as error:
                if getattr(error.orig, "sqlstate", None) != partitions.LOCK_NOT_AVAILABLE:
                    raise
                run.not_dropped[partition.name] = str(error.orig).splitlines()[0]
            else:
                run.dropped.setdefault(table, []).append(partition.name)
                run.dropped_rows[table] = run.dropped_rows.get(table, 0) + rows
            run.interrupted = not keep_going()
        elif partition.lower is None or partition.lower < cutoff:
            sql = partitions.chunk_delete_sql(table, partition.name, chunk_rows)
            _delete_in_chunks(
                run, table, chunk_rows, keep_going, functools.partial(_delete_partition_chunk, engine, sql, cutoff)
            )


def _delete_partition_chunk(engine: Engine, sql: str, cutoff: int) -> int:
    with engine.begin() as conn:
        return conn.exec_driver_sql(sql, {"cutoff": cutoff}).rowcount


def chunk_delete(dialect_name: str, table: Table, cutoff: int, limit: int) -> Delete:
    """SQLite's DELETE of at most `limit` rows timed before `cutoff`, by rowid (the
    table's own B-tree key, so each deletion is one lookup). PostgreSQL's is
    `partitions.chunk_delete_sql`, by ctid.

    A subquery with LIMIT, because SQLite (as usually built) does not accept
    DELETE ... LIMIT. `time < cutoff` is never true for a NULL time.
    """
    if dialect_name != "sqlite":
        raise ValueError(f"chunk_delete is SQLite's; {dialect_name} uses partitions.chunk_delete_sql")
    rowid: ColumnClause[Any] = literal_column("rowid")
    doomed = select(rowid).select_from(table).where(table.c[TIME_COLUMNS[table.name]] < cutoff).limit(limit)
    return delete(table).where(rowid.in_(doomed))


def checkpoint_wal(engine: Engine) -> bool | None:
    """Copy the WAL into the database file and truncate it: True if that happened,
    False if a reader kept it from finishing (the next run tries again), None when
    the database is not SQLite.

    Deleting many rows writes as many pages to the WAL, and the WAL file keeps its
    largest size until it is truncated. The freed pages stay in the database file and
    are reused by new rows.
    """
    if engine.dialect.name != "sqlite":
        return None
    with engine.connect() as conn:
        busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()[0]
    return not busy
