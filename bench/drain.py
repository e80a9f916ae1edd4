"""Part 2, drain: rows per second from the Redis lists into SQLite.

The real Drainer (claim from a real redis-server, parse, store in one transaction per
batch, acknowledge) against the limit: plain `sqlite3` `executemany` of the same rows,
pre-built, into the same schema with the same pragmas and the same transactions (one
per drain batch). Each round runs both back to back on fresh database files.

The frames are what a subscription task pushes at 5,000 msg/s: trade and aggTrade
frames of ten interleaved symbols, with a clock mark every 250 frames (50 ms).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from bench.figures import median, paired_ratio
from bench.frames import GENESIS_MS, trade_frames
from bench.procs import service_env
from worker.buffer import FrameBuffer, clock_mark
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.local_stack import LocalStack
from worker.store.drain import Drainer
from worker.store.parsing import Row, parse_frames
from worker.store.storage import TABLE_COLUMNS, create_schema, make_engine

FRAMES_PER_FLUSH = 250
PUSH_CHUNK = 10_000
DRAIN_BUDGET_SECONDS = 600.0
GROUP = Group("bench-drain", ("btcusdt@trade",))


def measure_drain(workdir: Path, frames: int, rounds: int, batch_size: int) -> dict[str, Any]:
    elements = with_clock_marks(trade_frames(frames))
    # The limit's input: the rows of each drain batch, parsed before the clock starts.
    batches = [parse_frames(elements[i : i + batch_size]).rows for i in range(0, len(elements), batch_size)]
    expected_rows = sum(len(rows) for batch in batches for rows in batch.values())
    directory = workdir / "drain"
    with LocalStack(directory, env=service_env()) as stack:
        client = redis.Redis.from_url(stack.start_redis())
        # One small unmeasured round: SQLAlchemy compiles its statements on first use.
        _drainer_seconds(
            client,
            elements[:batch_size],
            _fresh(directory / "drainer.db"),
            batch_size,
            sum(len(rows) for rows in batches[0].values()),
        )
        drainer_rates, limit_rates = [], []
        for _ in range(rounds):
            drainer_rates.append(
                expected_rows
                / _drainer_seconds(client, elements, _fresh(directory / "drainer.db"), batch_size, expected_rows)
            )
            limit_rates.append(expected_rows / _executemany_seconds(batches, _fresh(directory / "limit.db")))
    return {
        "rows_per_round": expected_rows,
        "rounds": rounds,
        "batch_size": batch_size,
        "drainer_rows_per_second": median(drainer_rates),
        "executemany_rows_per_second": median(limit_rates),
        "ratio": paired_ratio(drainer_rates, limit_rates),
        "per_round": {"drainer": drainer_rates, "executemany": limit_rates},
    }


def with_clock_marks(frames: Sequence[bytes]) -> list[bytes]:
    """The list as FrameWriter leaves it: a mark, then the frames of that flush."""
    elements: list[bytes] = []
    for start in range(0, len(frames), FRAMES_PER_FLUSH):
        elements.append(clock_mark(GENESIS_MS + start))
        elements.extend(frames[start : start + FRAMES_PER_FLUSH])
    return elements


def _fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return path


def _drainer_seconds(
    client: redis.Redis, elements: list[bytes], db: Path, batch_size: int, expected_rows: int
) -> float:
    client.flushdb()
    keys = RedisKeys("bench")
    GroupRegistry(client, keys).want(GROUP)
    key = FrameBuffer(client, keys).register(GROUP.id)
    for start in range(0, len(elements), PUSH_CHUNK):
        client.rpush(key, *elements[start : start + PUSH_CHUNK])
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    drainer = Drainer(client, keys, engine, batch_size)
    started = time.perf_counter()
    report = drainer.drain(time_budget=DRAIN_BUDGET_SECONDS)
    seconds = time.perf_counter() - started
    engine.dispose()
    if sum(report.rows.values()) != expected_rows or client.llen(key):
        raise RuntimeError(f"the drainer stored {dict(report.rows)}, expected {expected_rows} rows")
    return seconds


def _executemany_seconds(batches: Sequence[Mapping[str, list[Row]]], db: Path) -> float:
    """Plain sqlite3 on a connection set up by `make_engine` (WAL, synchronous=NORMAL)."""
    engine = make_engine(f"sqlite:///{db}")
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
