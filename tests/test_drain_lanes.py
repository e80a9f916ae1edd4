"""Drain lanes on PostgreSQL: runs store side by side, each its share of the lists, and
nothing is lost or stored twice, also when two runs meet on a list or one dies (real
Redis, real PostgreSQL server, real SQLite file for the one-writer rule)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from tests.conftest import clean_env, wait_until
from tests.test_drain import trade_frame
from tests.test_storage import T, kline
from worker.buffer import FrameBuffer, FrameWriter
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.book import BookUnknown, book_at
from worker.ops.local_postgres import PostgresServer
from worker.ops.local_stack import CELERY, LocalStack
from worker.store import drain as drain_module
from worker.store.books import RESYNCING, SYNCED, BookState
from worker.store.depth import snapshot_row
from worker.store.drain import (
    SPREAD_PASSES,
    Drainer,
    DrainLanes,
    DrainReport,
    DrainShift,
    _merged_rows,
    _past_the_node_cap,
    drain_holders,
    drain_lanes,
    take_a_lane,
)
from worker.store.parsing import parse_frames
from worker.store.storage import create_schema, gaps, make_engine, store_rows

SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT")


@pytest.fixture
def pg_engine(postgres_server: PostgresServer) -> Iterator[Engine]:
    engine = make_engine(postgres_server.create_database())
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def lists(redis_client: redis.Redis, keys: RedisKeys) -> list[str]:
    return want_lists(redis_client, keys)


def want_lists(client: redis.Redis, keys: RedisKeys) -> list[str]:
    """Three wanted groups' lists, one symbol each, in the sorted order lanes deal them."""
    registry, buffer = GroupRegistry(client, keys), FrameBuffer(client, keys)
    for symbol in SYMBOLS:
        registry.want(Group(id=symbol.lower(), streams=(f"{symbol.lower()}@trade",)))
        buffer.register(symbol.lower())
    return buffer.list_keys()


def test_lanes_deal_the_lists_and_a_run_also_stores_the_lanes_nobody_holds(
    redis_client: redis.Redis, keys: RedisKeys, lists: list[str]
) -> None:
    first, second = DrainLanes(redis_client, keys, 2, lane=0), DrainLanes(redis_client, keys, 2, lane=1)
    assert first.lists(lists) == lists  # lane 1 has no run: lane 0's stores its list too

    redis_client.set(keys.drain_lock(1), "drain-2:x")
    assert first.lists(lists) == [lists[0], lists[2]]
    redis_client.set(keys.drain_lock(0), "drain-1:y")
    assert second.lists(lists) == [lists[1]]
    # More lanes than lists: every list is a lane of its own.
    assert DrainLanes(redis_client, keys, 8, lane=2).lists(lists) == [lists[2]]


def test_each_run_takes_the_next_free_lane_up_to_the_lists_there_are(
    redis_client: redis.Redis, keys: RedisKeys, lists: list[str]
) -> None:
    runs = [take_a_lane(redis_client, keys, 60, lanes=4, node=f"default{i}@host") for i in range(4)]

    assert [run.lane if run else None for run in runs] == [0, 1, 2, None]  # three lists: three lanes
    assert take_a_lane(redis_client, keys, 60, lanes=1, node="default9@host") is None


def test_lanes_spread_over_the_worker_nodes_and_one_node_alone_takes_them_all(
    redis_client: redis.Redis, keys: RedisKeys, lists: list[str]
) -> None:
    first = take_a_lane(redis_client, keys, 60, lanes=2, node="default1@host-a")
    assert first is not None and first.lane == 0
    # The node storing lane 0 leaves lane 1 to other nodes for SPREAD_PASSES ticks...
    passes = [take_a_lane(redis_client, keys, 60, lanes=2, node="default1@host-a") for _ in range(SPREAD_PASSES)]
    assert passes == [None] * SPREAD_PASSES
    # ...and another node's run takes it at once.
    other = take_a_lane(redis_client, keys, 60, lanes=2, node="default2@host-b")
    assert other is not None and other.lane == 1
    assert {holder.split("@", 1)[1] for holder in drain_holders(redis_client, keys, 2).values()} == {
        "default1@host-a",
        "default2@host-b",
    }

    # With no other node, the one node takes the second lane after SPREAD_PASSES ticks.
    with other.held():
        pass  # lane 1 released
    late = [take_a_lane(redis_client, keys, 60, lanes=2, node="default1@host-a") for _ in range(SPREAD_PASSES + 1)]
    assert late[:SPREAD_PASSES] == [None] * SPREAD_PASSES
    assert late[-1] is not None and late[-1].lane == 1


def test_a_node_holds_at_most_all_its_processes_but_one_lanes(
    redis_client: redis.Redis, keys: RedisKeys, lists: list[str]
) -> None:
    first = take_a_lane(redis_client, keys, 60, lanes=3, node="default@host-a", node_processes=2)
    assert first is not None and first.lane == 0
    # However often it passes, a node of two processes never takes a second lane...
    ticks = [take_a_lane(redis_client, keys, 60, lanes=3, node="default@host-a", node_processes=2) for _ in range(20)]
    assert ticks == [None] * 20 and drain_holders(redis_client, keys, 3).keys() == {0}
    # ...but hands its own lane over between its runs, and other nodes take the rest.
    redis_client.set(keys.drain_relief(0), first.token)
    handed = take_a_lane(redis_client, keys, 60, lanes=3, node="default@host-a", node_processes=2)
    assert handed is not None and handed.lane == 0  # once the old run's lease lapses: nobody runs it here
    other = take_a_lane(redis_client, keys, 60, lanes=3, node="default@host-b", node_processes=2)
    assert other is not None and other.lane == 1
    # Two runs of one node that looked at once took a lane each: the one past the cap sees it.
    raced = DrainShift(redis_client, keys, 60, lane=2, node="default@host-b")
    assert raced.take_over()
    assert _past_the_node_cap(redis_client, keys, 3, "default@host-b", 2, most=1)
    assert not _past_the_node_cap(redis_client, keys, 3, "default@host-b", 1, most=1)
    raced.lease.release()
    # A node of three processes takes a second lane once other nodes had their chance.
    late = [take_a_lane(redis_client, keys, 60, lanes=3, node="big@host-c", node_processes=3) for _ in range(2)]
    assert late[0] is not None and late[0].lane == 2
    assert late[1] is None  # every lane held


def test_a_single_default_node_with_two_lanes_keeps_a_process_for_the_other_periodic_tasks(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """A real default worker of two processes and beat, DRAIN_LANES=2, frames flowing into
    three lists: the node holds one lane for good, its run also stores the other lane's
    lists, and supervise (and the other beat tasks) go on running in the second process."""
    stack = LocalStack(tmp_path, env=clean_env({"DATABASE_URL": postgres_server.create_database(), "DRAIN_LANES": "2"}))
    writers: Writers | None = None
    try:
        client, keys = redis.Redis.from_url(stack.start_redis()), RedisKeys("recorder")
        lists = want_lists(client, keys)
        writers = Writers(client, keys)
        writers.start()
        worker = stack.spawn("worker", [*CELERY, "worker", "-Q", "celery", "-c", "2", "-n", "default@%h", "-l", "INFO"])
        stack.start_beat()
        held: list[dict[int, str]] = []

        def many_ticks_later() -> bool:
            held.append(drain_holders(client, keys, 2))
            log = worker.log_text()
            ticks, supervised = log.count("Task tasks.drain["), log.count(" succeeded in ")
            return ticks >= 2 * 4 * SPREAD_PASSES and supervised >= 2 * 6  # ticks "received" and "succeeded"

        wait_until(many_ticks_later, 90, "20 drain ticks and 6 other tasks done", interval=0.1)
        # Two runs of the node may take a lane each at the same instant; the one past the
        # cap gives it back at once, so no two looks 0.1 s apart both see two lanes held.
        both = [pair for pair in zip(held, held[1:], strict=False) if len(pair[0]) == len(pair[1]) == 2]
        assert not both and any(held), f"two lanes held in {len(both)} pairs of looks out of {len(held)}: {both[:2]}"
        assert "Task tasks.supervise[" in worker.log_text()
        writers.stop.set()
        writers.join()
        wait_until(lambda: all(client.llen(key) == 0 for key in lists), 30, "every list stored by the one run")
    finally:
        if writers is not None:
            writers.stop.set()
        stack.stop()


def test_sqlite_keeps_one_writer_and_postgresql_gets_the_configured_lanes(tmp_path: Path, pg_engine: Engine) -> None:
    assert drain_lanes(make_engine(f"sqlite:///{tmp_path / 'one.db'}"), 4) == 1
    assert drain_lanes(pg_engine, 4) == 4


class Writers(threading.Thread):
    """One subscription task's writer per list: consecutive trade ids, 50 per flush every 5 ms."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        super().__init__(daemon=True)
        self.writers = {
            symbol: FrameWriter(client, keys, symbol.lower(), max_pending=100_000, max_list_length=1_000_000)
            for symbol in SYMBOLS
        }
        self.stop = threading.Event()
        self.written = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for symbol, writer in self.writers.items():
                writer.pending.extend(trade_frame(symbol, self.written + i) for i in range(1, 51))
                writer.flush()
            self.written += 50
            time.sleep(0.005)


class LaneRun(threading.Thread):
    """A drain run as tasks.drain makes it on PostgreSQL, noting when it stored a round."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, engine: Engine, lanes: int, node: str) -> None:
        super().__init__(daemon=True)
        self.client, self.keys, self.engine, self.lanes, self.node = client, keys, engine, lanes, node
        self.shift: DrainShift | None = None
        self.stop = threading.Event()
        self.rounds: list[tuple[float, float]] = []

    def run(self) -> None:
        self.shift = take_a_lane(self.client, self.keys, 60, self.lanes, self.node)
        assert self.shift is not None
        share = DrainLanes(self.client, self.keys, self.lanes, self.shift.lane)
        drainer = Drainer(self.client, self.keys, self.engine, 1000, share)
        store_round = drainer.store_round

        def timed_round(report: DrainReport, lists: list[str] | None = None) -> int:
            started = time.monotonic()
            claimed = store_round(report, lists)
            if claimed:
                self.rounds.append((started, time.monotonic()))
            return claimed

        drainer.store_round = timed_round  # type: ignore[method-assign]
        with self.shift.held():
            drainer.drain_window(self.shift.keep_going(self.stop.is_set))


def stored_trades(engine: Engine) -> dict[str, tuple[int, int, int, int]]:
    """Per symbol: rows, distinct ids, smallest and largest id."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "select symbol, count(*), count(distinct trade_id), min(trade_id), max(trade_id) "
                "from trades group by symbol"
            )
        )
        return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


def overlapping(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> int:
    return sum(1 for a in first for b in second if a[0] < b[1] and b[0] < a[1])


def test_two_lanes_store_side_by_side_and_every_trade_lands_once(
    redis_client: redis.Redis, keys: RedisKeys, pg_engine: Engine, lists: list[str]
) -> None:
    writers = Writers(redis_client, keys)
    writers.start()
    runs = [LaneRun(redis_client, keys, pg_engine, lanes=2, node=f"default{i}@host") for i in range(2)]
    for run in runs:
        run.start()
        wait_until(lambda run=run: run.rounds, 20, "the run to store")
    time.sleep(2)
    writers.stop.set()
    writers.join()
    wait_until(lambda: all(redis_client.llen(key) == 0 for key in lists), 30, "the lists to be drained")
    for run in runs:
        run.stop.set()
        run.join(10)

    assert sorted(run.shift.lane for run in runs if run.shift) == [0, 1]
    assert overlapping(*(run.rounds for run in runs)) > 0  # the two lanes' transactions ran at once
    expected = (writers.written, writers.written, 1, writers.written)
    assert stored_trades(pg_engine) == {symbol: expected for symbol in SYMBOLS}


def test_two_drains_on_the_same_lists_lose_nothing_and_store_nothing_twice(
    redis_client: redis.Redis, keys: RedisKeys, pg_engine: Engine, lists: list[str]
) -> None:
    """The worst meeting: two drains claim the same heads of the same lists (as for a
    round when a lane changes hands), the smaller claim commits and acknowledges first.
    The larger one's acknowledgement removes only what the first did not, and its copy of
    the shared rows is a no-op; then both drain the rest side by side."""
    writers = Writers(redis_client, keys)
    for symbol, writer in writers.writers.items():
        writer.pending.extend(trade_frame(symbol, i) for i in range(1, 20_001))
        writer.flush()
    small, large = Drainer(redis_client, keys, pg_engine, 700), Drainer(redis_client, keys, pg_engine, 1000)
    small_claims, large_claims = small.buffer.claim_many(lists, 700), large.buffer.claim_many(lists, 1000)
    for drainer, claims in ((small, small_claims), (large, large_claims)):
        parsed = [parse_frames(claim.elements) for claim in claims]
        with pg_engine.begin() as conn:
            stored = store_rows(conn, _merged_rows(parsed))
        drainer._acknowledge(claims, parsed, stored, {})
    # Removed: the clock mark and 999 frames, once; the flush's mark is back in front of the rest.
    assert [redis_client.llen(key) for key in lists] == [20_001 - 1000 + 1] * 3

    threads = [threading.Thread(target=drainer.drain, args=(60,)) for drainer in (small, large)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(redis_client.llen(key) == 0 for key in lists)
    assert stored_trades(pg_engine) == {symbol: (20_000, 20_000, 1, 20_000) for symbol in SYMBOLS}


def test_the_lists_of_a_dead_lane_are_stored_once_its_lease_lapses(
    redis_client: redis.Redis, keys: RedisKeys, pg_engine: Engine, lists: list[str]
) -> None:
    """Lane 1's run died holding its lane (no hand-over, no release): the live run of
    lane 0 stores lane 1's list as soon as the lease lapses, without waiting for a tick."""
    dead = DrainShift(redis_client, keys, 60, ttl_seconds=1.0, lane=1, node="default1@host")
    assert dead.take_over()
    live = LaneRun(redis_client, keys, pg_engine, lanes=2, node="default0@host")
    live.start()
    writers = Writers(redis_client, keys)
    writers.start()
    time.sleep(0.5)
    assert redis_client.llen(lists[1]) > 0 and redis_client.llen(lists[0]) < 500  # lane 1 waits
    wait_until(lambda: redis_client.get(keys.drain_lock(1)) is None, 5, "the dead run's lease to lapse")
    writers.stop.set()
    writers.join()
    wait_until(lambda: all(redis_client.llen(key) == 0 for key in lists), 20, "every list to be drained")
    live.stop.set()
    live.join(10)

    assert live.shift is not None and live.shift.lane == 0
    expected = (writers.written, writers.written, 1, writers.written)
    assert stored_trades(pg_engine) == {symbol: expected for symbol in SYMBOLS}


# -- one symbol's frames in two lists at once (regrouping), stored by two lanes --------

BOOK = "DDDUSDT"
BOOK_T0 = 1_800_000_000_000


def depth_frame(first: int, final: int) -> bytes:
    """A diff-depth frame of BOOK; its event time is BOOK_T0 + 100 ms per final id."""
    data = {
        "e": "depthUpdate", "E": BOOK_T0 + 100 * final, "s": BOOK, "U": first, "u": final,
        "b": [["10", str(final)]], "a": [["11", "1"]],
    }  # fmt: skip
    return orjson.dumps({"stream": f"{BOOK.lower()}@depth@100ms", "data": data})


def push(client: redis.Redis, keys: RedisKeys, group: str, events: list[tuple[int, int]]) -> str:
    writer = FrameWriter(client, keys, group, max_pending=1000, max_list_length=1000)
    FrameBuffer(client, keys).register(group)
    writer.pending.extend(depth_frame(first, final) for first, final in events)
    writer.flush()
    return writer.key


def tens(first: int, last: int) -> list[tuple[int, int]]:
    """Events of ten update ids each, from `first` to `last`."""
    return [(start, start + 9) for start in range(first, last, 10)]


def store_snapshot(engine: Engine, update_id: int) -> None:
    with engine.begin() as conn:
        store_rows(
            conn, {"depth_snapshots": [snapshot_row(BOOK, {"lastUpdateId": update_id, "bids": [], "asks": []}, 0)]}
        )


def race(monkeypatch: pytest.MonkeyPatch, drainers: dict[str, tuple[Drainer, str]], last_to_save: str) -> None:
    """Both runs read the book's state before either saves it (the race two lanes run
    when regrouping puts one symbol's frames in two lists), and `last_to_save` saves last."""
    both_followed = threading.Barrier(2, timeout=30)
    first_done = threading.Event()
    follow = drain_module.follow_books

    def racing_follow(*args: Any, **kwargs: Any) -> Any:
        followed = follow(*args, **kwargs)
        both_followed.wait()
        if threading.current_thread().name == last_to_save:
            assert first_done.wait(30)
        return followed

    def run(drainer: Drainer, key: str) -> None:
        drainer.store_round(DrainReport(), [key])
        if threading.current_thread().name != last_to_save:
            first_done.set()

    monkeypatch.setattr(drain_module, "follow_books", racing_follow)
    threads = [threading.Thread(target=run, args=pair, name=name) for name, pair in drainers.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    monkeypatch.undo()


@pytest.mark.parametrize("last_to_save", ["old", "new"])
@pytest.mark.parametrize("lost", [False, True], ids=["continuous", "updates 151-160 lost"])
def test_two_lanes_following_one_book_at_once_never_hide_a_break_nor_spoil_the_stored_book(
    redis_client: redis.Redis, keys: RedisKeys, pg_engine: Engine, monkeypatch: pytest.MonkeyPatch,
    last_to_save: str, lost: bool,
) -> None:  # fmt: skip
    """The book's continuity state is read at a round's start and saved whole after its
    commit, so two lanes storing one symbol at once may save in either order (last
    writer wins). Each saved state is true of the rows its run committed: the stored
    book (rebuilt from rows, `book_at`) is exact, a real break always leaves a gaps row
    and a snapshot request, and a stale state costs at worst a false break (the book
    marked unknown until the next snapshot), never a hidden one."""
    store_snapshot(pg_engine, 100)
    synced = Drainer(redis_client, keys, pg_engine, 1000)
    synced.store_round(DrainReport(), [push(redis_client, keys, "old", tens(101, 111))])
    assert BookState.load(redis_client, keys, BOOK).state == SYNCED
    old = push(redis_client, keys, "old", tens(111, 151))  # before the regrouping...
    new = push(redis_client, keys, "new", tens(161 if lost else 151, 201))  # ...and after it
    lanes = {name: (Drainer(redis_client, keys, pg_engine, 1000), key) for name, key in (("old", old), ("new", new))}

    race(monkeypatch, lanes, last_to_save)
    synced.store_round(DrainReport(), [push(redis_client, keys, "new", tens(201, 211))])

    state = BookState.load(redis_client, keys, BOOK)
    with pg_engine.connect() as conn:
        breaks = conn.execute(select(gaps.c.first_missing, gaps.c.last_missing).where(gaps.c.symbol == BOOK)).all()
    if lost:
        assert state.state == RESYNCING and redis_client.sismember(keys.books_needing_snapshot(), BOOK)
        assert any(start <= BOOK_T0 + 100 * 150 and end >= BOOK_T0 + 100 * 160 for start, end in breaks), breaks
        with pytest.raises(BookUnknown):
            book_at(pg_engine, BOOK, BOOK_T0 + 100 * 175)
    else:
        assert breaks  # the race did happen: a run that read the state before the other's save saw a (false) break
        book = book_at(pg_engine, BOOK, BOOK_T0 + 100 * 180)
        assert (book.update_id, book.bids) == (180, [(10.0, 180.0)])  # every update there, in order
        assert state.state == SYNCED or redis_client.sismember(keys.books_needing_snapshot(), BOOK)
    # Whichever state won, the next snapshot brings the book back.
    store_snapshot(pg_engine, 205)
    synced.store_round(DrainReport(), [push(redis_client, keys, "new", tens(211, 221))])
    assert BookState.load(redis_client, keys, BOOK).state == SYNCED
    assert book_at(pg_engine, BOOK, BOOK_T0 + 100 * 220).update_id == 220


def test_two_lanes_storing_one_open_kline_at_once_keep_its_newer_version(pg_engine: Engine) -> None:
    """The run holding the newer version commits first; the other, with the older one,
    waits on the row and then leaves it: the kline never goes back (storage's upsert)."""
    with pg_engine.begin() as conn:
        store_rows(conn, {"klines": [kline(close=1.0, is_closed=False, event_time=T + 1000)]})
    first = pg_engine.connect()
    transaction = first.begin()
    store_rows(first, {"klines": [kline(close=2.0, is_closed=False, event_time=T + 3000)]})

    def store_older() -> None:
        with pg_engine.begin() as conn:
            store_rows(conn, {"klines": [kline(close=1.5, is_closed=False, event_time=T + 2000)]})

    late = threading.Thread(target=store_older)
    late.start()
    waiting = "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and datname = current_database()"

    def waiters() -> int:
        # A transaction of its own per look: PostgreSQL reads pg_stat_activity once per
        # transaction, so looks inside one would repeat the first answer for ever.
        with pg_engine.connect() as watcher:
            return int(watcher.execute(text(waiting)).scalar_one())

    wait_until(waiters, 30, "the older version to wait on the row")
    transaction.commit()
    first.close()
    late.join(30)
    with pg_engine.connect() as conn:
        assert conn.execute(text("select close, event_time from klines")).one() == (2.0, T + 3000)
