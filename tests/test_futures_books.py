"""Futures order books and the futures REST budget, against the fake exchange (a real
process), a real Redis and a real SQLite file.

Diff-depth frames come from the fake's USDⓈ-M `/public` route over a real websocket,
are pushed into the market's frame list as a subscription task of that market pushes
them (FrameWriter) and drained into SQLite; snapshots come from the fake's
/fapi/v1/depth through the recorder's own client and budget. The rebuilt book must
equal the fake's own (`/usdm/fake/book`) level by level, and lost updates (the fake's
pause) must leave a `usdm:depth` gap, after which the book resyncs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from tests.conftest import clean_env, wait_until
from tests.test_fake_exchange import Fake, connect, running_fake
from worker.buffer import FrameBuffer, FrameWriter
from worker.exchange.ratelimit import FUTURES_POOL
from worker.exchange.rest import BinanceRest
from worker.exchange.snapshots import take_snapshots
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.book import BookUnknown, book_at
from worker.ops.status import book_statuses
from worker.settings import Settings
from worker.store.books import RESYNCING, SYNCED, BookState
from worker.store.drain import Drainer
from worker.store.storage import TABLES, create_schema, gaps, make_engine

ROOT = Path(__file__).resolve().parents[1]
SYMBOL, STREAM, GROUP = "BTCUSDT", "btcusdt@depth@100ms", "gfuturesbook"
COMPARED_LEVELS = 200  # within the snapshot's 1,000 levels whatever the price did since


class Recorder:
    """One USDⓈ-M diff-depth connection whose frames a thread keeps until `push`."""

    def __init__(self, fake: Fake, client: redis.Redis, keys: RedisKeys) -> None:
        self.ws = connect(fake.ws_url(f"/usdm/public/stream?streams={STREAM}"))
        self.frames: list[bytes] = []
        self.lock = threading.Lock()
        self.closed = False
        FrameBuffer(client, keys).register(GROUP, "usdm")
        self.writer = FrameWriter(client, keys, GROUP, max_pending=100_000, max_list_length=100_000, market="usdm")
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.closed:
            try:
                frame = self.ws.recv()
            except Exception:  # closed by `close`
                return
            with self.lock:
                self.frames.append(frame.encode() if isinstance(frame, str) else frame)

    def push(self) -> int:
        """Everything received so far into the usdm frame list, as one flush."""
        with self.lock:
            taken, self.frames = self.frames, []
        self.writer.pending.extend(taken)
        return self.writer.flush()

    def close(self) -> None:
        self.closed = True
        self.ws.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with running_fake() as f:
        yield f


@pytest.fixture
def setup(fake: Fake, redis_client: redis.Redis, tmp_path: Path) -> Iterator[tuple[Settings, Engine, Recorder]]:
    database_url = f"sqlite:///{tmp_path / 'binance.db'}"
    settings = Settings(
        redis_prefix="test",
        database_url=database_url,
        binance_usdm_rest_url=f"http://127.0.0.1:{fake.port}/usdm",
        binance_coinm_rest_url=f"http://127.0.0.1:{fake.port}/coinm",
    )
    engine = make_engine(database_url)
    create_schema(engine)
    keys = RedisKeys("test")
    GroupRegistry(redis_client, keys).want(Group(GROUP, (STREAM,), market="usdm"))
    recorder = Recorder(fake, redis_client, keys)
    yield settings, engine, recorder
    recorder.close()
    engine.dispose()


def drained(client: redis.Redis, engine: Engine, recorder: Recorder) -> BookState:
    """Push what arrived, drain it all, and return the book's state as the drain saw it."""
    recorder.push()
    report = Drainer(client, RedisKeys("test"), engine, batch_size=500).drain(time_budget=30)
    assert report.dead_letters == 0
    return BookState.load(client, RedisKeys("test"), SYMBOL, "usdm")


def snapshot(settings: Settings, client: redis.Redis, engine: Engine) -> dict[str, Any]:
    rest = BinanceRest.from_settings(settings, client, "usdm")
    return take_snapshots(settings, client, lambda: engine, rest)


def synced(settings: Settings, client: redis.Redis, engine: Engine, recorder: Recorder) -> bool:
    """One round of the recorder's beat: drain, and snapshot the books that need one."""
    state = drained(client, engine, recorder)
    if state.state != SYNCED:
        snapshot(settings, client, engine)
    return state.state == SYNCED


def events_drained_after(client: redis.Redis, engine: Engine, recorder: Recorder, update_id: int) -> int:
    """Drain what arrived; how many usdm diff-depth events are stored after `update_id`."""
    drained(client, engine, recorder)
    updates = TABLES["usdm_depth_updates"].c
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).where(updates.final_update_id > update_id)) or 0)


def last_event(engine: Engine) -> tuple[int, int]:
    """(final update id, event time) of the newest stored usdm diff-depth event."""
    updates = TABLES["usdm_depth_updates"].c
    with engine.connect() as conn:
        row = conn.execute(
            select(updates.final_update_id, updates.event_time).order_by(updates.final_update_id.desc()).limit(1)
        ).one()
    return row[0], row[1]


def assert_equals_the_fakes(fake: Fake, engine: Engine, at_ms: int) -> int:
    book = book_at(engine, SYMBOL, at_ms, market="usdm")
    status, _, truth = fake.get(f"/usdm/fake/book?symbol={SYMBOL}&update_id={book.update_id}")
    assert status == 200 and truth["update_id"] == book.update_id
    for side, ours in (("bids", book.bids), ("asks", book.asks)):
        theirs = [(float(price), float(qty)) for price, qty in truth[side][:COMPARED_LEVELS]]
        assert ours[:COMPARED_LEVELS] == theirs, side
    return book.update_id


def test_a_usdm_book_rebuilds_equal_to_the_fakes_and_resyncs_after_lost_updates(
    fake: Fake, redis_client: redis.Redis, setup: tuple[Settings, Engine, Recorder]
) -> None:
    settings, engine, recorder = setup
    wait_until(lambda: recorder.frames, 10, "the first diff-depth event")
    assert drained(redis_client, engine, recorder).state == RESYNCING  # no snapshot yet
    assert redis_client.smembers(RedisKeys("test").books_needing_snapshot("usdm")) == {SYMBOL.encode()}
    wait_until(lambda: synced(settings, redis_client, engine, recorder), 20, "the book synced on a snapshot")
    with engine.connect() as conn:
        columns = TABLES["usdm_depth_snapshots"].c
        snapshots = conn.execute(select(columns.last_update_id, columns.bids, columns.asks)).all()
    # Limit 1,000, the futures' deepest (the fake's near side may hold fewer levels).
    assert {max(len(bids), len(asks)) for _, bids, asks in snapshots} == {1000 * 16}
    snapshot_id = max(row[0] for row in snapshots)
    wait_until(lambda: events_drained_after(redis_client, engine, recorder, snapshot_id) >= 10, 10, "events on top")
    update_id = assert_equals_the_fakes(fake, engine, last_event(engine)[1])
    assert update_id > snapshot_id
    # status shows the book with its market; spot's books are none.
    [shown] = book_statuses(redis_client, RedisKeys("test"))
    assert (shown["symbol"], shown["market"], shown["state"]) == (SYMBOL, "usdm", SYNCED)
    assert book_statuses(redis_client, RedisKeys("test"), "spot") == []

    # Lost updates: the fake publishes nothing for a second, and the ids move on.
    before_pause = last_event(engine)
    fake_control = {"action": "pause_data", "seconds": 1.0}
    assert post(fake, "/usdm/fake/control", fake_control)["seconds"] == 1.0
    wait_until(lambda: drained(redis_client, engine, recorder).state == RESYNCING, 20, "the break seen by the drain")
    with engine.connect() as conn:
        [(kind, first_missing, last_missing)] = conn.execute(
            select(gaps.c.kind, gaps.c.first_missing, gaps.c.last_missing).where(gaps.c.symbol == SYMBOL)
        ).all()
    assert kind == "usdm:depth" and first_missing >= before_pause[1] and last_missing - first_missing >= 900
    with pytest.raises(BookUnknown, match="inside a gap of BTCUSDT's book"):
        book_at(engine, SYMBOL, (first_missing + last_missing) // 2, market="usdm")
    wait_until(lambda: synced(settings, redis_client, engine, recorder), 20, "the book synced again")
    resynced_at = last_event(engine)[0]
    wait_until(lambda: events_drained_after(redis_client, engine, recorder, resynced_at) >= 3, 10, "events after")
    assert_equals_the_fakes(fake, engine, last_event(engine)[1])
    # The book before the gap is intact (not at its last event: an instant is known only
    # while the next event continues it, as for spot).
    assert_equals_the_fakes(fake, engine, before_pause[1] - 300)

    # The CLI rebuilds the same book, and says which market a missing book is missing from.
    env = clean_env({"DATABASE_URL": settings.database_url})
    at = str(last_event(engine)[1])
    done = run_cli(env, "book", SYMBOL, "--market", "usdm", "--at", at, "--levels", "3", "--json")
    assert done.returncode == 0, done.stderr
    assert f'"update_id": {book_at(engine, SYMBOL, int(at), market="usdm").update_id}' in done.stdout
    spot = run_cli(env, "book", SYMBOL, "--at", at)
    assert spot.returncode == 1 and "no order book of BTCUSDT is recorded" in spot.stderr
    coinm = run_cli(env, "book", "BTCUSD_PERP", "--market", "coinm", "--at", at)
    assert coinm.returncode == 1 and "--market coinm --streams depth@100ms" in coinm.stderr
    bad = run_cli(env, "book", SYMBOL, "--market", "futures", "--at", at)
    assert bad.returncode == 2 and "invalid choice: 'futures'" in bad.stderr and "Traceback" not in bad.stderr


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "worker.ops.cli", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def post(fake: Fake, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{fake.port}{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def test_futures_requests_spend_one_budget_for_both_markets_and_never_spots(redis_client: redis.Redis) -> None:
    """Two depth(1000) requests of USDⓈ-M and one of COIN-M spend 60 of a budget of 60:
    the next request of either market waits for the next minute instead of being sent.
    A fake of its own: Binance's count (the weight header) must hold only these requests."""
    while time.time() % 60 > 50:  # all requests in one UTC minute
        time.sleep(0.2)
    with running_fake() as own:
        spend_the_futures_budget(own, redis_client)


def spend_the_futures_budget(fake: Fake, redis_client: redis.Redis) -> None:
    class Waited(Exception):
        pass

    def refuse_to_wait(seconds: float) -> None:
        raise Waited(seconds)

    budgeted = Settings(
        redis_prefix="test",
        binance_usdm_rest_url=f"http://127.0.0.1:{fake.port}/usdm",
        binance_coinm_rest_url=f"http://127.0.0.1:{fake.port}/coinm",
        futures_rest_weight_budget_per_minute=60,
    )
    usdm = BinanceRest.from_settings(budgeted, redis_client, "usdm")
    coinm = BinanceRest.from_settings(budgeted, redis_client, "coinm")
    for rest in (usdm, coinm):
        rest.pacer.sleep = refuse_to_wait
    minute = int(time.time()) // 60
    assert usdm.depth(SYMBOL, 5000)["lastUpdateId"]  # asked as 1,000: the futures' deepest
    assert usdm.depth(SYMBOL, 1000)["lastUpdateId"]
    assert coinm.depth("BTCUSD_PERP", 1000)["lastUpdateId"]
    keys = RedisKeys("test")
    assert int(redis_client.get(keys.rest_weight(minute, FUTURES_POOL)) or 0) >= 60
    assert redis_client.get(keys.rest_weight(minute)) is None  # spot's budget is untouched
    with pytest.raises(Waited):
        coinm.open_interest("BTCUSD_PERP")
    with pytest.raises(Waited):
        usdm.depth(SYMBOL, 50)


def test_the_futures_budget_is_refused_outside_binances_limit() -> None:
    env = clean_env({"FUTURES_REST_WEIGHT_BUDGET_PER_MINUTE": "2401"})
    done = run_cli(env, "status")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: environment variable FUTURES_REST_WEIGHT_BUDGET_PER_MINUTE=2401 is out of range: it must be "
        "between 1 and 2400; unset it to use the default 1200"
    ]
