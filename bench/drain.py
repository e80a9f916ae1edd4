"""Part 2, drain: rows per second from the Redis lists into SQLite or PostgreSQL.

The real Drainer (claim from a real redis-server, parse, store in one transaction per
batch, acknowledge) against the limit, the same rows, pre-built, stored into the same
schema with the same transactions (one per drain batch) by the plainest fast path of
the backend:
- SQLite: `sqlite3` `executemany`, with the same pragmas;
- PostgreSQL: psycopg's `COPY ... FROM STDIN`, one per table and batch (the Drainer
  stores with COPY too, inside a savepoint, see worker/store/storage.py).
Each round runs both back to back, each on a fresh database (file, or CREATE DATABASE).

The frames are what a subscription task pushes at 5,000 msg/s: trade and aggTrade
frames of ten interleaved symbols, with a clock mark every 250 frames (50 ms).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from bench.database import POSTGRESQL, SQLITE, Databases
from bench.figures import median, paired_ratio
from bench.frames import GENESIS_MS, trade_frames
from bench.procs import service_env
from worker.buffer import FrameBuffer, clock_mark
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.local_postgres import connect
from worker.ops.local_stack import LocalStack
from worker.store.drain import Drainer
from worker.store.parsing import Row, parse_frames
from worker.store.storage import TABLE_COLUMNS, create_schema, make_engine

FRAMES_PER_FLUSH = 250
PUSH_CHUNK = 10_000
DRAIN_BUDGET_SECONDS = 600.0
GROUP = Group("bench-drain", ("btcusdt@trade",))


REFERENCES = {SQLITE: "executemany", POSTGRESQL: "copy"}


def measure_drain(
    workdir: Path, frames: int, rounds: int, batch_size: int, databases: Databases | None = None
) -> dict[str, Any]:
    databases = databases or Databases()
    reference = REFERENCES[databases.backend]
    elements = with_clock_marks(trade_frames(frames))
    # The limit's input: the rows of each drain batch, parsed before the clock starts.
    batches = [parse_frames(elements[i : i + batch_size]).rows for i in range(0, len(elements), batch_size)]
    expected_rows = sum(len(rows) for batch in batches for rows in batch.values())
    directory = workdir / "drain"
    directory.mkdir(parents=True, exist_ok=True)
    limit_seconds = _executemany_seconds if databases.backend == SQLITE else _copy_seconds

    def measured(seconds_of: Any, tag: str, *args: Any) -> float:
        url = databases.fresh(directory / f"{tag}.db", tag)
        try:
            return float(seconds_of(*args, url))
        finally:
            databases.drop(url)

    with LocalStack(directory, env=service_env()) as stack:
        client = redis.Redis.from_url(stack.start_redis())
        # One small unmeasured round: SQLAlchemy compiles its statements on first use
        # (and on PostgreSQL, of plain COPY too: psycopg looks up the types it adapts).
        first_rows = sum(len(rows) for rows in batches[0].values())
        measured(_drainer_seconds, "drainer", client, elements[:batch_size], batch_size, first_rows)
        if databases.backend == POSTGRESQL:
            measured(limit_seconds, reference, batches[:1])
        drainer_rates, limit_rates = [], []
        for _ in range(rounds):
            drainer_seconds = measured(_drainer_seconds, "drainer", client, elements, batch_size, expected_rows)
            drainer_rates.append(expected_rows / drainer_seconds)
            limit_rates.append(expected_rows / measured(limit_seconds, reference, batches))
    return {
        "database": databases.backend,
        "reference": reference,
        "rows_per_round": expected_rows,
        "rounds": rounds,
        "batch_size": batch_size,
        "drainer_rows_per_second": median(drainer_rates),
        f"{reference}_rows_per_second": median(limit_rates),
        "reference_rows_per_second": median(limit_rates),
        "ratio": paired_ratio(drainer_rates, limit_rates),
        "per_round": {"drainer": drainer_rates, reference: limit_rates},
    }


def with_clock_marks(frames: Sequence[bytes]) -> list[bytes]:
    """The list as FrameWriter leaves it: a mark, then the frames of that flush."""
    elements: list[bytes] = []
    for start in range(0, len(frames), FRAMES_PER_FLUSH):
        elements.append(clock_mark(GENESIS_MS + start))
        elements.extend(frames[start : start + FRAMES_PER_FLUSH])
    return elements


def _drainer_seconds(
    client: redis.Redis, elements: list[bytes], batch_size: int, expected_rows: int, database_url: str
) -> float:
    client.flushdb()
    keys = RedisKeys("bench")
    GroupRegistry(client, keys).want(GROUP)
    key = FrameBuffer(client, keys).register(GROUP.id)
    for start in range(0, len(elements), PUSH_CHUNK):
        client.rpush(key, *elements[start : start + PUSH_CHUNK])
    engine = make_engine(database_url)
    create_schema(engine)
    drainer = Drainer(client, keys, engine, batch_size)
    started = time.perf_counter()
    report = drainer.drain(time_budget=DRAIN_BUDGET_SECONDS)
    seconds = time.perf_counter() - started
    engine.dispose()
    if sum(report.rows.values()) != expected_rows or client.llen(key):
        raise RuntimeError(f"the drainer stored {dict(report.rows)}, expected {expected_rows} rows")
    return seconds


def _executemany_seconds(batches: Sequence[Mapping[str, list[Row]]], database_url: str) -> float:
    """Plain sqlite3 on a connection set up by `make_engine` (WAL, synchronous=NORMAL)."""
    engine = make_engine(database_url)
    create_schema(engine)
    pooled = engine.raw_connection()
    conn: Any = pooled.driver_connection  # the sqlite3.Connection itself
    statements = {
        table: f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})"
        for table, columns in TABLE_COLUMNS.items()
    }
    started = time.perf_counter()
    for batch in batches:
        for table, rows in batch.items():
            if rows:
                conn.executemany(statements[table], rows)
        conn.commit()
    seconds = time.perf_counter() - started
    pooled.close()
    engine.dispose()
    return seconds


def _copy_seconds(batches: Sequence[Mapping[str, list[Row]]], database_url: str) -> float:
    """Plain psycopg: one COPY per table and batch, one transaction per batch."""
    engine = make_engine(database_url)
    create_schema(engine)
    engine.dispose()
    # Quoted, as storage does: some column names (window) are reserved words.
    statements = {
        table: f"COPY {table} ({', '.join(_quoted(column) for column in columns)}) FROM STDIN"
        for table, columns in TABLE_COLUMNS.items()
    }
    with connect(database_url, autocommit=True) as conn, conn.cursor() as cursor:
        started = time.perf_counter()
        for batch in batches:
            with conn.transaction():
                for table, rows in batch.items():
                    if rows:
                        with cursor.copy(statements[table]) as copy:
                            for row in rows:
                                copy.write_row(row)
        seconds = time.perf_counter() - started
    return seconds


def _quoted(identifier: str) -> str:
    return '"' + identifier + '"'
