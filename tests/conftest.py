"""Shared fixtures: a real redis-server, and whole local stacks (Redis, fake exchange,
Celery workers and beat as separate processes) built with the code `binance-recorder
run` uses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.replay_recording import CLEAN_SECONDS, SYMBOL, Recording, Replay, depth_span, quiet_end, rows, run_cli
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_postgres import INSTALL_HINT, PostgresServer, find_postgres_bin
from worker.ops.local_stack import LocalStack
from worker.ops.stack_record import RECORDED_VARIABLES
from worker.store.storage import create_schema, make_engine

# Short intervals so that end-to-end tests see the periodic tasks act within seconds.
FAST_ENV = {
    "DRAIN_INTERVAL_SECONDS": "0.5",
    "SUPERVISE_INTERVAL_SECONDS": "2",
    "LEASE_TTL_SECONDS": "3",
}
# Settings of the machine running the tests must not leak into the stacks they start.
_SERVICE_VARIABLES = (*RECORDED_VARIABLES, "ARCHIVE_DIR")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    stack = LocalStack(tmp_path_factory.mktemp("redis"))
    yield stack.start_redis()
    stack.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.fail(INSTALL_HINT)
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database on each backend: a SQLite file, and a database of the
    session's PostgreSQL server. Tests of SQLite-only behaviour make their own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'binance.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """The schema in a new database of each backend."""
    engine = make_engine(database_url)
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


@pytest.fixture
def keys() -> RedisKeys:
    return RedisKeys("test")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARIABLES}
    env.update(FAST_ENV)
    env.update(extra or {})
    return env


def launch_stack(
    directory: Path, fake_args: Sequence[str] = (), env: dict[str, str] | None = None, stream_concurrency: int = 4
) -> LocalStack:
    """A full stack: Redis, the fake exchange, both workers and beat. Stop it when done."""
    stack = LocalStack(directory, env=clean_env(env))
    try:
        stack.start_redis()
        stack.start_fake_exchange(fake_args)
        stack.start_workers(stream_concurrency)
        stack.start_beat()
        stack.wait_for_workers(["worker-streams", "worker"])
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def db(stack: LocalStack) -> Iterator[Engine]:
    """The database of the module's `stack` fixture (a module may define its own)."""
    engine = make_engine(stack.env["DATABASE_URL"])
    yield engine
    engine.dispose()


def fake_stats(stack: LocalStack) -> dict[str, Any]:
    return requests.get(f"{stack.env['BINANCE_REST_URL']}/fake/stats", timeout=5).json()


def fake_control(stack: LocalStack, action: str, **fields: object) -> dict[str, Any]:
    """Steer the fake exchange (fake_binance/control.py); fails on a refused action."""
    response = requests.post(
        f"{stack.env['BINANCE_REST_URL']}/fake/control", json={"action": action, **fields}, timeout=5
    )
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def call(stack: LocalStack, name: str, *args: object, **kwargs: object) -> Any:
    """Call a task by name and wait for its result, as an app without this code would."""
    return client_app(stack.env["REDIS_URL"]).send_task(name, args=args, kwargs=kwargs).get(timeout=60)


def cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """`binance-recorder <args>` against the stack, as an operator would run it."""
    return run_cli(stack.env, *args)


def status_command(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """`binance-recorder status` against the stack, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "status", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


ID_COLUMNS = {"trade": ("trades", "trade_id"), "aggTrade": ("agg_trades", "agg_id")}


def stored_ids(db: Engine, kind: str, symbol: str, first: int, last: int) -> tuple[int, int]:
    """(rows, distinct ids) of `symbol`'s trades or aggregate trades with ids in [first, last]."""
    table, column = ID_COLUMNS[kind]
    with db.connect() as conn:
        return tuple(
            conn.execute(
                text(
                    f"select count(*), count(distinct {column}) from {table} "
                    f"where symbol = :s and {column} between :a and :b"
                ),
                {"s": symbol, "a": first, "b": last},
            ).one()
        )  # type: ignore[return-value]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- a recording to replay (tests/replay_recording.py) ---------------------------------


@pytest.fixture(scope="module")
def recording(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """A real stack's recording of the fake (trades, aggTrades, bookTickers and depth@100ms of
    SYMBOL) with a lost stretch of depth, unless the module sets `RECORD_GAP = False`."""
    with_gap = getattr(request.module, "RECORD_GAP", True)
    stack = launch_stack(tmp_path_factory.mktemp("replay"), fake_args=["--trades-per-second", "10"])
    gap: tuple[int, int] | None = None
    try:
        engine = make_engine(stack.env["DATABASE_URL"])
        done = run_cli(stack.env, "subscribe", SYMBOL, "--streams", "trade,aggTrade,bookTicker,depth@100ms")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: depth_span(engine) > (CLEAN_SECONDS + 1) * 1000, 40, "seconds of depth recorded")
        if with_gap:
            gap = _record_a_depth_gap(stack, engine)
        env = dict(stack.env)
    finally:
        stack.stop()
    first_diff = rows(
        engine,
        "select min(u.received_at) from depth_updates u where u.symbol = :s and u.final_update_id > "
        "(select min(last_update_id) from depth_snapshots where symbol = :s)",
        s=SYMBOL,
    )[0][0]
    start = first_diff + 1000
    gap_begins = after_gap = None
    if gap is not None:
        gap_begins = rows(engine, "select min(received_at) from depth_updates where event_time = :e", e=gap[0])[0][0]
        after_gap = quiet_end(engine, gap[1] + 1000)
    yield Recording(env, engine, start, quiet_end(engine, start + 3500), gap_begins, after_gap)


def _record_a_depth_gap(stack: LocalStack, engine: Engine) -> tuple[int, int]:
    """Pause the fake's data: the diffs of the pause are lost, a depth gap the drain records.
    Its (first_missing, last_missing) once the book is known again and diffs follow."""
    fake_control(stack, "pause_data", seconds=1.5)
    gap = wait_until(
        lambda: rows(engine, "select first_missing, last_missing from gaps where kind = 'depth' and last_missing > 0"),
        30,
        "the depth gap recorded and the book known again",
    )[0]
    wait_until(
        lambda: (
            rows(engine, "select max(event_time) from depth_updates where symbol = :s", s=SYMBOL)[0][0] > gap[1] + 1500
        ),
        20,
        "diffs after the gap",
    )
    return gap


@pytest.fixture
def replay_of(recording: Recording) -> Iterator[Any]:
    started: list[Replay] = []

    def start(*args: str, end: int | None = None, start: int | None = None) -> Replay:
        window = ["--start", str(start or recording.start), "--end", str(end or recording.end)]
        started.append(Replay(recording.env, *window, "--symbols", SYMBOL, *args))
        return started[-1]

    yield start
    for replay in started:
        if replay.process.poll() is None:
            replay.process.kill()
            replay.process.wait()
