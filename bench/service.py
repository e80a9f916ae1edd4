"""Parts 3, 4 and 5 on the deployed shape: end-to-end latency, memory, and scale.

LocalStack runs what `binance-recorder run` runs, each a process of its own: a
redis-server, the fake exchange, `celery -A worker worker` for the `streams` queue
and for the default queue, and `celery -A worker beat` (which starts the drain every
DRAIN_INTERVAL_SECONDS). The benchmark is only a client: it subscribes through
Celery, steers the fake's rate, watches the database (a SQLite file, or a fresh
PostgreSQL database with --database-url) and reads /proc. `start_stack` starts that
shape against any DATABASE_URL, for other parts to reuse.

Two phases on the same stack:
- steady: 10 symbols x trade and aggTrade at 250 trades/s each: 5,000 msg/s on one
  connection; latency and the resident size of the subscription task's and the
  drain's processes;
- scale: `scale_symbols` generated symbols x trade and aggTrade, cut by subscribe into
  groups of at most 1,024 streams (so one connection carries 1,024), at about the
  same total rate; latency and memory again.
Afterwards every trade and aggregate-trade id the fake sent (GET /fake/stats) must be
in the database exactly once. The periodic backfill is switched off for the run, so
that a loss cannot be repaired from REST behind the benchmark's back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import redis
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from bench.database import Databases
from bench.figures import latency_summary
from bench.frames import KINDS, TARGET_RATE
from bench.procs import children, cpu_seconds, holds_connection_to, holds_file_open, service_env
from bench.watch import MemoryTrack, NotReady, Watcher, drain_processes, open_row_watcher, poll_until, stream_processes
from fake_binance.config import DEFAULT_SYMBOLS, FakeExchangeConfig
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_stack import LocalStack

STREAM_PROCESSES = 4
NO_BACKFILL_SECONDS = 86400 * 365
TASK_TIMEOUT_SECONDS = 120.0
SETTLE_TIMEOUT_SECONDS = 60.0
MEMORY_SAMPLE_SECONDS = 1.0
_ID_COLUMNS = {"trade": ("trades", "trade_id"), "aggTrade": ("agg_trades", "agg_id")}


class Service:
    """The running stack, seen as a client sees it."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.rest_url = stack.env["BINANCE_REST_URL"]
        self.exchange_port = int(self.rest_url.rsplit(":", 1)[1])
        self.database_url = stack.env["DATABASE_URL"]
        self.redis = redis.Redis.from_url(stack.env["REDIS_URL"])
        self.keys = RedisKeys("recorder")

    def call(self, task: str, *args: object, **kwargs: object) -> Any:
        result = client_app(self.stack.env["REDIS_URL"]).send_task(task, args=args, kwargs=kwargs)
        return result.get(timeout=TASK_TIMEOUT_SECONDS)

    def set_rate(self, trades_per_second: float) -> None:
        body: dict[str, Any] = {"action": "set_rate", "trades_per_second": trades_per_second}
        requests.post(f"{self.rest_url}/fake/control", json=body, timeout=10).raise_for_status()

    def fake_stats(self) -> dict[str, Any]:
        return requests.get(f"{self.rest_url}/fake/stats", timeout=10).json()

    def holds_database(self, pid: int) -> bool:
        """Whether the process has the database open: the SQLite file, or a connection
        to the PostgreSQL server."""
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite":
            return holds_file_open(pid, Path(url.database or ""))
        return holds_connection_to(pid, url.port or 5432)

    def pid(self, name: str) -> int:
        return self.stack.process(name).popen.pid

    def backlog(self) -> int:
        return sum(int(self.redis.llen(key)) for key in self.redis.smembers(self.keys.buffers))

    def group_sizes(self, group_ids: Sequence[str]) -> list[int]:
        wanted = GroupRegistry(self.redis, self.keys).wanted()
        return [len(wanted[gid].streams) for gid in group_ids if gid in wanted]


def start_stack(
    directory: Path,
    env: dict[str, str],
    database_url: str | None = None,
    stream_processes: int = STREAM_PROCESSES,
    fake_args: Sequence[str] = (),
) -> LocalStack:
    """The deployed shape, started: a redis-server, the fake exchange (`fake_args`), the
    `streams` worker with `stream_processes` processes, the default worker and beat,
    all storing into `database_url` (default: the SQLite file `directory/binance.db`).
    Stop it when done (it is a context manager)."""
    env = dict(env)
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    stack = LocalStack(directory, env=env)
    try:
        stack.start_redis()
        stack.start_fake_exchange(fake_args)
        stack.start_workers(stream_processes)
        stack.start_beat()
        stack.wait_for_workers(["worker-streams", "worker"])
    except BaseException:
        stack.stop()
        raise
    return stack


def measure_service(
    workdir: Path,
    duration: float,
    warmup: float,
    scale_duration: float,
    scale_symbols: int,
    drain_interval: float,
    databases: Databases | None = None,
) -> dict[str, Any]:
    databases = databases or Databases()
    env = service_env(drain_interval_seconds=drain_interval, backfill_interval_seconds=NO_BACKFILL_SECONDS)
    directory = workdir / "service"
    database_url = databases.fresh(directory / "binance.db", "service")
    try:
        with start_stack(directory, env, database_url, fake_args=["--extra-symbols", str(scale_symbols)]) as stack:
            service = Service(stack)
            idle = _idle_cpu(service, warmup)
            steady = _phase(service, list(DEFAULT_SYMBOLS), warmup, duration)
            generated = [
                s for s in FakeExchangeConfig(extra_symbols=scale_symbols).all_symbols() if s.startswith("SYM")
            ]
            scale = _phase(service, generated, warmup, scale_duration)
            ids = compare_with_sent(service)
    finally:
        databases.drop(database_url)
    return {
        "end_to_end": {
            "database": databases.backend,
            **steady["latency"],
            "offered_messages_per_second": steady["rate"],
            "symbols": len(DEFAULT_SYMBOLS),
            "drain_interval_seconds": drain_interval,
            "seconds": duration,
            "warmup_seconds": warmup,
        },
        "memory": {
            "database": databases.backend,
            "seconds": duration,
            "subscription_task": steady["memory"][0],
            "drain": steady["memory"][1],
        },
        "drain_cpu": {
            "database": databases.backend,
            "idle": idle,
            "loaded": {**steady["drain_cpu"], "offered_messages_per_second": steady["rate"]},
        },
        "scale": {
            "database": databases.backend,
            "symbols": scale_symbols,
            "streams_per_group": scale["group_sizes"],
            "offered_messages_per_second": scale["rate"],
            "drain_interval_seconds": drain_interval,
            "seconds": scale_duration,
            "latency": scale["latency"],
            "memory": {"subscription_tasks": scale["memory"][0], "drain": scale["memory"][1]},
            "ids": ids,
        },
    }


def _phase(service: Service, symbols: list[str], warmup: float, seconds: float) -> dict[str, Any]:
    """Record `symbols` at TARGET_RATE for warmup + seconds, then unsubscribe and settle."""
    per_symbol = TARGET_RATE / len(symbols) / len(KINDS)
    service.set_rate(per_symbol)
    subscribed = service.call("tasks.subscribe", symbols, streams=list(KINDS))
    watcher = _first_rows(service, symbols)
    poll_until(time.monotonic() + warmup, watcher, [], MEMORY_SAMPLE_SECONDS)
    tracks = [
        MemoryTrack("subscription task", stream_processes(service.pid("worker-streams"), service.exchange_port)),
        MemoryTrack("drain", drain_processes(service.pid("worker"), service.holds_database)),
    ]
    cpu = DrainCpu(service)
    watcher.receive_lags.clear()
    polls: list[int] = []
    started = time.monotonic()
    latencies = poll_until(started + seconds, watcher, tracks, MEMORY_SAMPLE_SECONDS, polls)
    poll_ms = (time.monotonic() - started) / max(1, polls[0]) * 1000
    drain_cpu = cpu.since_start()
    for track in tracks:
        track.sample()
    group_sizes = service.group_sizes(subscribed["groups"])
    watcher.close()
    service.call("tasks.unsubscribe", symbols)
    settle(service)
    return {
        "rate": per_symbol * len(symbols) * len(KINDS),
        "latency": {
            **latency_summary(latencies),
            "event_to_receive": latency_summary(watcher.receive_lags),
            "mean_poll_interval_ms": poll_ms,
        },
        "memory": [track.as_dict() for track in tracks],
        "group_sizes": group_sizes,
        "drain_cpu": drain_cpu,
    }


class DrainCpu:
    """CPU used by the default worker (the drain runs in its pool processes, taking
    turns, and its main process hands them beat's ticks), as a share of one core."""

    def __init__(self, service: Service) -> None:
        self.pids = [service.pid("worker"), *children(service.pid("worker"))]
        self.started = time.monotonic()
        self.cpu = cpu_seconds(self.pids)

    def since_start(self) -> dict[str, float]:
        seconds = time.monotonic() - self.started
        return {"seconds": seconds, "cpu_share": (cpu_seconds(self.pids) - self.cpu) / seconds}


def _idle_cpu(service: Service, seconds: float) -> dict[str, float]:
    """The drain's CPU with nothing subscribed, after the first runs made the schema."""
    time.sleep(seconds)
    cpu = DrainCpu(service)
    time.sleep(seconds)
    return cpu.since_start()


def _first_rows(service: Service, symbols: Sequence[str]) -> Watcher:
    """A watcher, once the drain has created the schema and stored the phase's first rows."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    watcher = _open_watcher(service.database_url, symbols, deadline)
    while not watcher.new_latencies():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no rows reached {service.database_url} within {SETTLE_TIMEOUT_SECONDS:.0f}s")
        time.sleep(0.05)
    return watcher


def _open_watcher(database_url: str, symbols: Sequence[str], deadline: float) -> Watcher:
    while True:
        try:
            return open_row_watcher(database_url, symbols)
        except NotReady:  # no file or no tables yet: the first drain makes them
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Settling(Protocol):
    """A running stack seen from outside: the fake exchange's figures and Redis's backlog."""

    def fake_stats(self) -> dict[str, Any]: ...

    def backlog(self) -> int: ...


def settle(service: Settling, timeout: float = SETTLE_TIMEOUT_SECONDS) -> None:
    """Wait until every connection is closed and every buffered frame is drained."""
    deadline = time.monotonic() + timeout
    while service.fake_stats()["connections"]["open"] or service.backlog():
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not settle: connections still open or frames left in Redis")
        time.sleep(0.2)


def compare_with_sent(service: Service) -> dict[str, Any]:
    """Every trade and aggregate-trade id the fake sent, against the database.

    The drain may still be storing the last frames: compared again until they match
    or SETTLE_TIMEOUT_SECONDS pass, and the last comparison is the answer.
    """
    ranges = _sent_ranges(service.fake_stats()["sent"])
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while True:
        summary = _id_summary(service.database_url, ranges)
        if summary["lost_nothing"] or time.monotonic() > deadline:
            return summary
        time.sleep(0.5)


def _sent_ranges(sent: dict[str, dict[str, dict[str, int]]]) -> list[tuple[str, str, int, int, int]]:
    """(symbol, kind, first id, last id, messages sent) of every trade-like stream."""
    return [
        (symbol, kind, tally["first"], tally["last"], tally["count"])
        for symbol, kinds in sorted(sent.items())
        for kind, tally in sorted(kinds.items())
        if kind in _ID_COLUMNS and "first" in tally
    ]


def _id_summary(database_url: str, ranges: list[tuple[str, str, int, int, int]]) -> dict[str, Any]:
    """Ids missing from the sent ranges, and rows outside them or stored twice."""
    missing = extra = duplicates = stored_rows = expected_ids = sent_messages = 0
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            for symbol, kind, first, last, count in ranges:
                table, column = _ID_COLUMNS[kind]
                rows, distinct, in_range = conn.execute(
                    text(
                        f"SELECT count(*), count(DISTINCT {column}), "
                        f"coalesce(sum(CASE WHEN {column} BETWEEN :first AND :last THEN 1 ELSE 0 END), 0) "
                        f"FROM {table} WHERE symbol = :symbol"
                    ),
                    {"first": first, "last": last, "symbol": symbol},
                ).one()
                expected_ids += last - first + 1
                sent_messages += count
                stored_rows += rows
                missing += last - first + 1 - in_range
                extra += rows - in_range
                duplicates += rows - distinct
    finally:
        engine.dispose()
    return {
        "streams_checked": len(ranges),
        "ids_sent": expected_ids,
        "messages_sent": sent_messages,
        "rows_stored": stored_rows,
        "missing": missing,
        "extra": extra,
        "duplicates": duplicates,
        "lost_nothing": bool(ranges) and missing == extra == duplicates == 0,
    }
