"""Drain runs relay each other: a window hand-over with no gap and no double drain, a
lost beat tick that costs nothing, and a SIGKILLed drain whose successor takes over
(real Redis, real SQLite, real Celery processes for the last)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.conftest import call, launch_stack, wait_until
from tests.test_drain import trade_frame, trade_ids
from worker.buffer import FrameBuffer, FrameWriter
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys, as_text
from worker.ops.local_stack import LocalStack
from worker.store.drain import Drainer, DrainReport, DrainShift, drain_holders
from worker.store.storage import create_schema, make_engine

GROUP = Group(id="g1", streams=("btcusdt@trade",))


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'relay.db'}")
    create_schema(engine)
    return engine


class RecordingDrainer(Drainer):
    """The real drainer, noting which run stored each round and whether two overlapped."""

    active = 0
    overlaps = 0
    rounds: list[tuple[str, float, float]] = []

    def __init__(self, name: str, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.name = name

    def store_round(self, report: DrainReport, lists: list[str] | None = None) -> int:
        cls = RecordingDrainer
        cls.active += 1
        cls.overlaps += cls.active > 1
        started = time.monotonic()
        claimed = super().store_round(report, lists)
        if claimed:
            cls.rounds.append((self.name, started, time.monotonic()))
        cls.active -= 1
        return claimed


class Run(threading.Thread):
    """One drain run as tasks.drain makes it: take over, drain the window, hand on."""

    def __init__(self, name: str, client: redis.Redis, keys: RedisKeys, engine: Engine, window: float = 60) -> None:
        super().__init__(name=name, daemon=True)
        self.shift = DrainShift(client, keys, window_seconds=window)
        self.drainer = RecordingDrainer(name, client, keys, engine, 1000)
        self.stop = threading.Event()
        self.took_over: bool | None = None
        self.report: DrainReport | None = None

    def run(self) -> None:
        self.took_over = self.shift.take_over()
        if self.took_over:
            with self.shift.held():
                self.report = self.drainer.drain_window(self.shift.keep_going(self.stop.is_set))


class Writer(threading.Thread):
    """A subscription task's writer: consecutive trade ids, 20 per flush every 5 ms, until stopped."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        super().__init__(daemon=True)
        self.writer = FrameWriter(client, keys, GROUP.id, max_pending=100_000, max_list_length=1_000_000)
        self.stop = threading.Event()
        self.written = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.writer.pending.extend(trade_frame("BTCUSDT", self.written + i) for i in range(1, 21))
            self.written += 20
            self.writer.flush()
            time.sleep(0.005)


@pytest.fixture
def group(redis_client: redis.Redis, keys: RedisKeys) -> Iterator[str]:
    GroupRegistry(redis_client, keys).want(GROUP)
    RecordingDrainer.rounds, RecordingDrainer.overlaps, RecordingDrainer.active = [], 0, 0
    yield FrameBuffer(redis_client, keys).register(GROUP.id)


def watch_lock(client: redis.Redis, keys: RedisKeys, stop: threading.Event, holders: list[str | None]) -> None:
    """Every value the drain lock takes, including None when it is free."""
    while not stop.is_set():
        value = client.get(keys.drain_lock())
        holder = as_text(value) if value is not None else None
        if not holders or holders[-1] != holder:
            holders.append(holder)
        time.sleep(0.0005)


def relief_wanted(client: redis.Redis, keys: RedisKeys) -> bool:
    """No run holds the lock, or the one that does has asked for relief."""
    holder = client.get(keys.drain_lock())
    return holder is None or client.get(keys.drain_relief()) == holder


def test_runs_hand_over_without_a_gap_and_never_drain_together(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine, group: str
) -> None:
    holders: list[str | None] = []
    watching = threading.Event()
    watcher = threading.Thread(target=watch_lock, args=(redis_client, keys, watching, holders), daemon=True)
    watcher.start()
    writer = Writer(redis_client, keys)
    writer.start()
    # Short windows, so each run soon asks for relief; the last one stays to drain the rest.
    runs = [Run(f"run{i}", redis_client, keys, engine, window=1 if i < 3 else 60) for i in range(4)]
    for run in runs:  # the next tick's run, once the one before asked for relief
        wait_until(lambda: relief_wanted(redis_client, keys), 10, "the running run to ask for relief", interval=0.01)
        run.start()
        wait_until(lambda run=run: run.took_over, 10, f"{run.name} to take over", interval=0.01)
        wait_until(lambda run=run: any(r[0] == run.name for r in RecordingDrainer.rounds), 10, f"{run.name} storing")
    writer.stop.set()
    writer.join()
    wait_until(lambda: redis_client.llen(group) == 0, 10, "the list to be drained")
    runs[-1].stop.set()
    runs[-1].join(10)
    wait_until(lambda: holders[-1] is None, 5, "the watcher to see the lock released", interval=0.01)
    watching.set()
    watcher.join()

    assert trade_ids(engine) == list(range(1, writer.written + 1))  # everything stored, once
    assert RecordingDrainer.overlaps == 0  # never two runs storing at once
    # Each run got the lock straight from the one before: the lock was never free between them.
    assert all(run.shift.handed_over_by_holder for run in runs[1:])
    tokens = [run.shift.token for run in runs]
    assert holders[0] in (None, tokens[0])  # free before the first run, and (above) after the last
    assert [h for h in holders if h is not None] == tokens
    assert None not in holders[holders.index(tokens[0]) : holders.index(tokens[-1])]
    # And the runs' rounds follow each other in order: a run stores only after the last stopped.
    names = [name for name, _, _ in sorted(RecordingDrainer.rounds, key=lambda r: r[1])]
    assert [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name] == [r.name for r in runs]


def test_a_lost_beat_tick_leaves_the_running_drain_storing(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine, group: str
) -> None:
    """The run's window is over and it asks for relief, but no successor arrives (the
    tick's message expired in a busy worker's queue): the run goes on storing what
    arrives, instead of leaving it for a later tick."""
    run = Run("run", redis_client, keys, engine, window=2)
    run.start()
    writer = FrameWriter(redis_client, keys, GROUP.id, max_pending=1000, max_list_length=10_000)
    writer.pending.extend(trade_frame("BTCUSDT", i) for i in range(1, 11))
    writer.flush()
    wait_until(lambda: trade_ids(engine) == list(range(1, 11)), 10, "the first frames stored")
    wait_until(lambda: redis_client.get(keys.drain_relief()) is not None, 10, "the run to ask for relief")
    writer.pending.extend(trade_frame("BTCUSDT", i) for i in range(11, 21))
    writer.flush()

    wait_until(lambda: trade_ids(engine) == list(range(1, 21)), 10, "the frames after the lost tick stored")
    assert run.is_alive() and {name for name, _, _ in RecordingDrainer.rounds} == {"run"}
    assert as_text(redis_client.get(keys.drain_lock()) or b"") == run.shift.token
    run.stop.set()
    run.join(10)
    assert redis_client.get(keys.drain_lock()) is None


def test_a_run_that_waits_in_vain_gives_up_to_a_newer_one(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine, group: str
) -> None:
    """Two runs wait for a holder stuck in a long round: the older one steps aside, so
    there is never more than one successor, and that one gets the lock."""
    holder = DrainShift(redis_client, keys, window_seconds=60)
    assert holder.take_over()
    redis_client.set(keys.drain_relief(), holder.token, px=10_000)  # as its keep_going does after its window
    older, newer = (Run(name, redis_client, keys, engine) for name in ("older", "newer"))
    older.start()
    wait_until(lambda: redis_client.get(keys.drain_successor()) is not None, 10, "the older run to ask")
    newer.start()
    older.join(10)
    with holder.held():
        pass  # the round ends: the holder hands over
    wait_until(lambda: newer.took_over, 10, "the newer run to take over", interval=0.01)

    assert older.took_over is False and newer.shift.handed_over_by_holder
    newer.stop.set()
    newer.join(10)


def test_a_tick_within_the_running_window_returns_at_once(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine, group: str
) -> None:
    holder = DrainShift(redis_client, keys, window_seconds=60)
    assert holder.take_over()
    tick = DrainShift(redis_client, keys, window_seconds=60)

    assert tick.take_over() is False
    assert redis_client.get(keys.drain_successor()) is None  # it did not ask for a hand-over
    assert as_text(redis_client.get(keys.drain_lock()) or b"") == holder.token
    with holder.held():
        pass
    assert redis_client.get(keys.drain_lock()) is None  # no successor waited: released


def drain_holder_pid(client: redis.Redis) -> int | None:
    """The drain lock's value is `drain-<pid>@<host>:<uuid>`."""
    holder = drain_holders(client, RedisKeys("recorder"), 1).get(0)
    return int(holder.split("@")[0]) if holder else None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path, fake_args=["--trades-per-second", "50"])
    yield stack
    stack.stop()


def test_a_sigkilled_drain_is_succeeded_within_its_short_lease(stack: LocalStack) -> None:
    """The old lock outlived a killed drain by a minute: storage stopped for ~70 s."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    db = make_engine(stack.env["DATABASE_URL"])
    call(stack, "tasks.subscribe", ["BTCUSDT"], streams=["trade"])

    def stored() -> int:
        with db.connect() as conn:
            return int(conn.execute(text("select count(*) from trades")).scalar_one())

    wait_until(lambda: stored() > 0, 30, "the first trades stored")
    killed = wait_until(lambda: drain_holder_pid(client), 10, "a drain run holding the lock")
    os.kill(killed, signal.SIGKILL)
    at_kill = stored()

    # Well inside the old lock's 65 s (0.5 s interval x 10 + 60), far beyond the new 3 s lease.
    successor = wait_until(lambda: (pid := drain_holder_pid(client)) not in (None, killed) and pid, 20, "a successor")
    wait_until(lambda: stored() > at_kill + 100, 20, "trades stored after the kill")
    assert successor != killed
    with db.connect() as conn:
        count, distinct = conn.execute(text("select count(*), count(distinct trade_id) from trades")).one()
        first, last = conn.execute(text("select min(trade_id), max(trade_id) from trades")).one()
    assert count == distinct == last - first + 1  # nothing lost across the kill, nothing twice
