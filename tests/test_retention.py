"""Retention: old rows go, in chunks, against real SQLite files (and a real worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, event, func, inspect, select
from sqlalchemy.dialects import sqlite

from tests.conftest import clean_env
from tests.test_storage import SAMPLE_ROWS
from worker.keys import RedisKeys
from worker.ops.local_postgres import PostgresServer
from worker.ops.local_stack import CELERY, LocalStack
from worker.settings import Settings
from worker.store.partitions import chunk_delete_sql
from worker.store.retention import (
    DAY_MS,
    RetentionPolicy,
    chunk_delete,
    delete_expired_rows,
    parse_overrides,
)
from worker.store.storage import (
    TABLE_COLUMNS,
    TABLES,
    TIME_COLUMNS,
    create_schema,
    make_engine,
    store_rows,
)
from worker.times import now_ms

NOW = 1_700_000_000_000
OLD = NOW - 40 * DAY_MS
RECENT = NOW - 1 * DAY_MS


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "retention.db"


@pytest.fixture
def sqlite_engine(db_path: Path) -> Engine:
    """For SQLite's own behaviour (the WAL file); the other tests run on both backends."""
    engine = make_engine(f"sqlite:///{db_path}")
    create_schema(engine)
    return engine


def row(table: str, n: int, at: int | None) -> tuple[Any, ...]:
    """The sample row of `table`, made its symbol's n-th row and timed `at`."""
    values = dict(zip(TABLE_COLUMNS[table], SAMPLE_ROWS[table], strict=False))
    values[TABLES[table].primary_key.columns.values()[-1].name] = n
    values[TIME_COLUMNS[table]] = at
    return tuple(values[column] for column in TABLE_COLUMNS[table])


def store(engine: Engine, table: str, count: int, start: int, first_n: int = 1) -> None:
    """`count` rows one millisecond apart from `start`, keys from `first_n` up."""
    with engine.begin() as conn:
        store_rows(conn, {table: [row(table, first_n + i, start + i) for i in range(count)]})


def store_old_and_recent(engine: Engine, count: int = 3) -> None:
    for table in TABLES:
        store(engine, table, count, OLD)
        store(engine, table, count, RECENT, first_n=count + 1)


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            name: conn.execute(select(func.count()).select_from(table)).scalar_one() for name, table in TABLES.items()
        }


def policy(environ: dict[str, str] | None = None) -> RetentionPolicy:
    """Delete by age alone: retention that requires day files is tested in test_dayfiles.py."""
    return RetentionPolicy.from_settings(Settings.from_env({"RETENTION_REQUIRES_ARCHIVE": "false", **(environ or {})}))


def keep_all_but(table: str, days: int, chunk_rows: int) -> RetentionPolicy:
    return RetentionPolicy(default_days=0, overrides={table: days}, chunk_rows=chunk_rows)


def test_old_rows_go_recent_rows_stay_and_klines_are_kept_by_default(engine: Engine) -> None:
    store_old_and_recent(engine)
    run = delete_expired_rows(engine, policy(), NOW)
    limited = [table for table in TABLES if table != "klines"]
    assert run.deleted == dict.fromkeys(limited, 3)
    assert counts(engine) == {**dict.fromkeys(limited, 3), "klines": 6}
    with engine.connect() as conn:
        oldest = conn.execute(select(func.min(TABLES["trades"].c.trade_time))).scalar_one()
    assert oldest == RECENT


def test_rows_without_a_time_are_kept(engine: Engine) -> None:
    with engine.begin() as conn:
        store_rows(conn, {"book_tickers": [row("book_tickers", 1, None), row("book_tickers", 2, OLD)]})
    assert delete_expired_rows(engine, policy(), NOW).deleted["book_tickers"] == 1
    with engine.connect() as conn:
        assert conn.execute(select(TABLES["book_tickers"].c.update_id)).scalars().all() == [1]


def test_overrides_replace_the_default_per_table(engine: Engine) -> None:
    for table in ("trades", "tickers", "book_tickers", "klines"):
        store(engine, table, 2, NOW - 10 * DAY_MS)
    overrides = {"RETENTION_OVERRIDES": "tickers=7, book_tickers=2,klines=9"}
    run = delete_expired_rows(engine, policy(overrides), NOW)
    assert {t: run.deleted[t] for t in ("trades", "tickers", "book_tickers", "klines")} == {
        "trades": 0, "tickers": 2, "book_tickers": 2, "klines": 2,
    }  # fmt: skip
    assert run.cutoffs["tickers"] == NOW - 7 * DAY_MS


def test_retention_days_zero_keeps_everything(engine: Engine) -> None:
    store_old_and_recent(engine)
    before = counts(engine)
    run = delete_expired_rows(engine, policy({"RETENTION_DAYS": "0"}), NOW)
    assert (run.cutoffs, run.deleted, run.chunks) == ({}, {}, 0)
    assert counts(engine) == before


def test_rows_go_in_chunks_of_one_transaction_each(engine: Engine) -> None:
    store(engine, "trades", 25, OLD)
    store(engine, "trades", 5, RECENT, first_n=100)
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    run = delete_expired_rows(engine, keep_all_but("trades", 30, chunk_rows=10), NOW)
    assert run.deleted == {"trades": 25}
    assert run.chunks == 3  # 10 + 10 + 5
    assert len(commits) == 3
    assert counts(engine)["trades"] == 5


def test_a_lost_lock_stops_the_run_after_the_chunk_in_hand(engine: Engine) -> None:
    store(engine, "trades", 25, OLD)
    run = delete_expired_rows(engine, keep_all_but("trades", 30, chunk_rows=10), NOW, keep_going=lambda: False)
    assert (run.deleted, run.chunks, run.interrupted) == ({"trades": 10}, 1, True)
    assert counts(engine)["trades"] == 15


def test_the_wal_is_truncated_after_deleting(sqlite_engine: Engine, db_path: Path) -> None:
    store(sqlite_engine, "trades", 5000, OLD)
    wal = Path(f"{db_path}-wal")
    assert wal.stat().st_size > 0
    run = delete_expired_rows(sqlite_engine, keep_all_but("trades", 30, chunk_rows=1000), NOW)
    assert run.deleted == {"trades": 5000}
    assert run.wal_truncated is True
    assert wal.stat().st_size == 0


def test_nothing_to_delete_needs_no_checkpoint(engine: Engine) -> None:
    store(engine, "trades", 3, RECENT)
    assert delete_expired_rows(engine, policy(), NOW).wal_truncated is None


def test_every_time_column_is_indexed(engine: Engine) -> None:
    inspector = inspect(engine)
    for table, column in TIME_COLUMNS.items():
        assert [column] in [index["column_names"] for index in inspector.get_indexes(table)]


def test_sqlite_deletes_by_rowid_postgresql_by_ctid() -> None:
    """Each deletion one lookup: check the SQL a chunk sends (PostgreSQL's plan too)."""
    table = TABLES["trades"]
    lite = str(chunk_delete("sqlite", table, NOW, 10).compile(dialect=sqlite.dialect()))
    assert lite.startswith("DELETE FROM trades WHERE rowid IN (SELECT rowid \nFROM trades")
    assert chunk_delete_sql("trades", "trades_p20260101", 10) == (
        "DELETE FROM trades_p20260101 WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM trades_p20260101 WHERE trade_time < %(cutoff)s LIMIT 10))"
    )


def test_a_postgresql_chunk_finds_its_rows_by_tid_not_by_scanning_the_table(
    postgres_server: PostgresServer,
) -> None:
    engine = make_engine(postgres_server.create_database())
    create_schema(engine, partitioned=False)
    store(engine, "trades", 2000, OLD)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE trades")
        plan = conn.exec_driver_sql("EXPLAIN " + chunk_delete_sql("trades", "trades", 10), {"cutoff": NOW}).all()
    engine.dispose()
    assert "Tid Scan on trades" in "\n".join(line for (line,) in plan)


def test_overrides_are_parsed() -> None:
    assert parse_overrides(" tickers = 7 ,book_tickers=2,, ") == {"tickers": 7, "book_tickers": 2}
    assert parse_overrides("") == {}
    assert policy().overrides == {"klines": 0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "tikers=7",
            r"RETENTION_OVERRIDES='tikers=7': unknown table 'tikers'; the tables are trades, ",
        ),
        ("tickers", r"RETENTION_OVERRIDES='tickers': 'tickers' is not TABLE=DAYS"),
        ("tickers=-1", r"'tickers=-1': days must be a whole number, 0 to keep the table for ever"),
        ("tickers=1.5", r"'tickers=1.5': days must be a whole number"),
    ],
)
def test_a_bad_override_is_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy({"RETENTION_OVERRIDES": text})


def test_bad_numbers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"RETENTION_DAYS=-1 is out of range: it must be at least 0"):
        policy({"RETENTION_DAYS": "-1"})
    with pytest.raises(ValueError, match=r"RETENTION_CHUNK_ROWS=0 is out of range: it must be at least 1"):
        policy({"RETENTION_CHUNK_ROWS": "0"})


def test_the_task_runs_on_a_real_worker_one_run_at_a_time(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, env=clean_env({"RETENTION_CHUNK_ROWS": "4", "RETENTION_REQUIRES_ARCHIVE": "false"}))
    try:
        url = stack.start_redis()
        stack.spawn(
            "worker",
            [*CELERY, "worker", "-Q", "celery", "-c", "1", "-n", "default@%h", "-l", "INFO"],
        )
        engine = make_engine(stack.env["DATABASE_URL"])
        create_schema(engine)
        now = now_ms()
        store(engine, "trades", 10, now - 31 * DAY_MS)
        store(engine, "trades", 2, now - DAY_MS, first_n=100)
        stack.wait_for_workers(["worker"])
        client = Celery(broker=url, backend=url)
        lock = RedisKeys(Settings().redis_prefix).retention_lock
        client.backend.client.set(lock, "someone else")
        skipped = client.send_task("tasks.enforce_retention").get(timeout=30)
        client.backend.client.delete(lock)
        result = client.send_task("tasks.enforce_retention").get(timeout=30)
    finally:
        stack.stop()
    assert skipped == {"skipped": "another retention run is in progress"}
    assert result["deleted"]["trades"] == 10 and result["chunks"] >= 3
    assert result["wal_truncated"] is True
    assert counts(engine)["trades"] == 2
