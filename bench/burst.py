"""Part 3b, burst: 100,000 frames arriving at once on one subscription, until all are stored.

The deployed shape with default settings (LocalStack: redis-server, both Celery
workers and beat as processes), pointed at the blast server, which writes the whole
stream (trade and aggTrade frames of ten symbols) as fast as the receiver takes it.
The group is made wanted in Redis and started by `tasks.supervise`, as after a restart.

Timing, on this machine's clock, by polling every 10 ms. Start: the poll that first sees
the group's message count in Redis (its first flush), minus one flush interval, the
earliest the first frame can have arrived. End: the poll of the SQLite file that first
sees every row.
The reference is the bare websocket-client loop on the same blast server in the same
run (first to last frame received), before and after the recorder's round.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import redis

from bench.figures import median
from bench.frames import STREAMS
from bench.ingest import ROUND_TIMEOUT_SECONDS, bare_loop_seconds
from bench.procs import module_command, service_env, spawn_and_wait
from bench.watch import POLL_SECONDS, TABLES
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_stack import LocalStack
from worker.settings import Settings

BURST_FRAMES = 100_000
GROUP = Group("bench-burst", STREAMS)
NO_BACKFILL_SECONDS = 86400 * 365
UNREACHABLE_REST = "http://127.0.0.1:9"  # the burst needs no REST; nothing may reach Binance


def measure_burst(workdir: Path, frames: int = BURST_FRAMES) -> dict[str, Any]:
    env = service_env(backfill_interval_seconds=NO_BACKFILL_SECONDS, binance_rest_url=UNREACHABLE_REST)
    with LocalStack(workdir / "burst", env=env) as stack:
        stack.start_redis()
        url = spawn_and_wait(
            stack, "blast", module_command("bench.blast", "--frames", frames), r"blast listening on (ws://\S+)"
        ).group(1)
        bare_seconds = [bare_loop_seconds(stack, url, frames)]
        stack.env["BINANCE_WS_URL"] = url
        stack.start_workers(1)
        stack.start_beat()
        stack.wait_for_workers(["worker-streams", "worker"])
        recorder_seconds, received_seconds = _recorder_seconds(stack, frames)
        bare_seconds.append(bare_loop_seconds(stack, url, frames))
    bare = median(bare_seconds)
    return {
        "frames": frames,
        "streams": len(STREAMS),
        "recorder_seconds": recorder_seconds,
        "received_seconds": received_seconds,  # until the subscription task had pushed them all
        "bare_loop_seconds": bare,
        "ratio": recorder_seconds / bare,
        "per_round": {"bare_loop": bare_seconds},
    }


def _recorder_seconds(stack: LocalStack, frames: int) -> tuple[float, float]:
    """Seconds until every frame was stored, and until every frame was in Redis."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    keys = RedisKeys("recorder")
    registry = GroupRegistry(client, keys)
    db = stack.data_dir / "binance.db"
    _wait_for_schema(db)
    registry.want(GROUP)
    client_app(stack.env["REDIS_URL"]).send_task("tasks.supervise").get(timeout=ROUND_TIMEOUT_SECONDS)
    deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
    first_flush: float | None = None
    all_received: float | None = None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None) as conn:
        while _stored(conn) < frames:
            if all_received is None:
                pushed = int(client.hget(keys.status(GROUP.id), "messages") or 0)
                if first_flush is None and pushed:
                    first_flush = time.time()
                if pushed >= frames:
                    all_received = time.time()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{_stored(conn)} of {frames} burst frames stored in {ROUND_TIMEOUT_SECONDS:.0f}s")
            time.sleep(POLL_SECONDS)
        done = time.time()
    registry.unwant(GROUP.id)
    if first_flush is None:
        raise RuntimeError("every burst frame was stored before the first flush was seen: poll faster")
    start = first_flush - Settings.flush_interval_ms / 1000
    return done - start, (all_received or done) - start


def _wait_for_schema(db: Path) -> None:
    """The first drain run creates the tables; the burst starts once they exist."""
    deadline = time.monotonic() + ROUND_TIMEOUT_SECONDS
    while True:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                _stored(conn)
                return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stored(conn: sqlite3.Connection) -> int:
    """Rows stored: the largest rowid, a lookup (count(*) would scan the table every
    10 ms and take CPU from the processes measured); equal to the count, since the
    burst's rows are all new and nothing deletes."""
    return sum(int(conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {table}").fetchone()[0]) for table in TABLES)
