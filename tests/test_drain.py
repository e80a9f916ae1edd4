"""The drain against a real Redis and a real SQLite file: batches land once, bad
frames are dead-lettered, and a drain that dies after its commit loses nothing."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from worker.buffer import FrameBuffer, clock_mark
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.store.drain import Drainer
from worker.store.storage import create_schema, make_engine


def trade_frame(symbol: str, trade_id: int) -> bytes:
    payload = {
        "e": "trade",
        "E": 1_700_000_000_000 + trade_id,
        "s": symbol,
        "t": trade_id,
        "p": "1.5",
        "q": "2",
        "T": 1_700_000_000_000 + trade_id,
        "m": True,
        "M": True,
    }
    return orjson.dumps({"stream": f"{symbol.lower()}@trade", "data": payload})


def push(client: redis.Redis, keys: RedisKeys, group: str, frames: list[bytes]) -> str:
    GroupRegistry(client, keys).want(Group(id=group, streams=("btcusdt@trade",)))
    key = FrameBuffer(client, keys).register(group)
    client.rpush(key, clock_mark(1_700_000_000_000), *frames)
    return key


def trade_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(text("select trade_id from trades order by trade_id"))]


def test_drain_stores_every_frame_in_batches_and_empties_the_list(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    key = push(redis_client, keys, "g1", [trade_frame("BTCUSDT", i) for i in range(1, 2501)])

    report = Drainer(redis_client, keys, engine, batch_size=1000).drain(time_budget=30)

    assert trade_ids(engine) == list(range(1, 2501))
    assert report.frames == 2500 and report.rows["trades"] == 2500 and report.batches == 3
    assert redis_client.llen(key) == 0


def test_a_drain_that_dies_after_its_commit_loses_nothing_and_stores_nothing_twice(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = push(redis_client, keys, "g1", [trade_frame("BTCUSDT", i) for i in range(1, 501)])

    def die(*args: object, **kwargs: object) -> None:
        raise ConnectionError("worker killed between commit and removal")

    monkeypatch.setattr(FrameBuffer, "ack", die)
    with pytest.raises(ConnectionError):
        Drainer(redis_client, keys, engine, batch_size=200).drain(time_budget=30)
    # The first batch (a clock mark and 199 frames) was committed ...
    assert trade_ids(engine) == list(range(1, 200))
    assert redis_client.llen(key) == 501  # ... but is still in Redis

    monkeypatch.undo()
    report = Drainer(redis_client, keys, engine, batch_size=200).drain(time_budget=30)

    assert trade_ids(engine) == list(range(1, 501))
    assert report.rows["trades"] == 301  # the 199 stored before were not stored again
    assert redis_client.llen(key) == 0


def test_malformed_frames_are_dead_lettered_with_a_reason_and_the_batch_still_lands(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    bad = [b"not json", b'{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT"}}']
    push(redis_client, keys, "g1", [trade_frame("BTCUSDT", 1), *bad, trade_frame("BTCUSDT", 2)])

    report = Drainer(redis_client, keys, engine, batch_size=100).drain(time_budget=30)

    assert trade_ids(engine) == [1, 2]
    assert report.dead_letters == 2
    letters = [json.loads(x) for x in redis_client.lrange(keys.dead_letters, 0, -1)]
    assert [letter["frame"] for letter in letters] == [frame.decode() for frame in bad]
    assert "invalid JSON" in letters[0]["reason"]
    assert "'t'" in letters[1]["reason"] or "'p'" in letters[1]["reason"]
    assert redis_client.hget(keys.counters, "dead_letters") == b"2"


def test_the_list_of_an_unsubscribed_group_is_drained_then_forgotten(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    key = push(redis_client, keys, "g1", [trade_frame("ETHUSDT", 7)])
    GroupRegistry(redis_client, keys).unwant("g1")

    Drainer(redis_client, keys, engine, batch_size=100).drain(time_budget=30)

    assert trade_ids(engine) == [7]
    assert FrameBuffer(redis_client, keys).list_keys() == []
    assert redis_client.exists(key) == 0


def test_a_locked_database_fails_the_drain_run_without_losing_the_batch(
    redis_client: redis.Redis, keys: RedisKeys, tmp_path: Path
) -> None:
    path = tmp_path / "locked.db"
    impatient = make_engine(f"sqlite:///{path}", busy_timeout_ms=100)
    create_schema(impatient)
    key = push(redis_client, keys, "g1", [trade_frame("BTCUSDT", i) for i in range(1, 11)])
    blocker = sqlite3.connect(path)
    blocker.execute("begin exclusive")
    try:
        with pytest.raises(OperationalError, match="locked"):
            Drainer(redis_client, keys, impatient, batch_size=100).drain(time_budget=30)
        assert redis_client.llen(key) == 11
    finally:
        blocker.rollback()
        blocker.close()

    Drainer(redis_client, keys, impatient, batch_size=100).drain(time_budget=30)

    assert trade_ids(impatient) == list(range(1, 11))
    assert redis_client.llen(key) == 0


BOOK_TICKER = json.loads((Path(__file__).parent / "fixtures" / "binance-doc-examples.json").read_text())["bookTicker"]


def book_ticker_frames(first_update: int, count: int) -> list[bytes]:
    """Binance's documented bookTicker frame (no time of its own), in a combined envelope."""
    return [
        orjson.dumps({"stream": "bnbusdt@bookTicker", "data": {**BOOK_TICKER, "u": u}})
        for u in range(first_update, first_update + count)
    ]


def received_at_by_update(engine: Engine) -> dict[int, int | None]:
    with engine.connect() as conn:
        return {u: at for u, at in conn.execute(text("select update_id, received_at from book_tickers"))}


def received_seq_by_update(engine: Engine) -> dict[int, int | None]:
    with engine.connect() as conn:
        return {u: seq for u, seq in conn.execute(text("select update_id, received_seq from book_tickers"))}


def test_a_flush_cut_by_a_batch_boundary_keeps_its_receive_time_across_runs_and_restarts(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    """The issue's case: two flushes of 305 bookTicker frames, the batch boundary inside
    the second; the drain that took the first batch stops, a new one (a restart) takes
    the rest. Every row must carry its own flush's clock mark, none NULL, and its
    frame's place in its flush, whatever batch it was stored in."""
    first, second = book_ticker_frames(1, 150), book_ticker_frames(151, 155)
    key = FrameBuffer(redis_client, keys).register("g1")
    redis_client.rpush(key, clock_mark(1_700_000_000_050), *first, clock_mark(1_700_000_000_100), *second)
    batches = 0

    def after_one_batch() -> bool:
        nonlocal batches
        batches += 1
        return batches > 1

    # 200 elements: the first mark, 150 frames, the second mark and 48 of its 155 frames.
    Drainer(redis_client, keys, engine, batch_size=200).drain(time_budget=30, should_stop=after_one_batch)
    assert len(received_at_by_update(engine)) == 198
    # The cut flush's mark, put back with the place of the first frame left.
    assert redis_client.lindex(key, 0) == clock_mark(1_700_000_000_100, 48) == b"@1700000000100:48"

    Drainer(redis_client, keys, engine, batch_size=50).drain(time_budget=30)  # a new drain, small batches

    stored = received_at_by_update(engine)
    assert stored == {u: 1_700_000_000_050 if u <= 150 else 1_700_000_000_100 for u in range(1, 306)}
    assert received_seq_by_update(engine) == {u: u - 1 if u <= 150 else u - 151 for u in range(1, 306)}
    assert redis_client.llen(key) == 0


def test_a_batch_ending_on_a_flush_boundary_puts_no_mark_back(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    key = push(redis_client, keys, "g1", book_ticker_frames(1, 9))  # a mark and 9 frames
    redis_client.rpush(key, clock_mark(1_700_000_000_200), *book_ticker_frames(10, 5))

    Drainer(redis_client, keys, engine, batch_size=10).drain(time_budget=30, should_stop=iter([False, True]).__next__)

    assert redis_client.lrange(key, 0, 0) == [clock_mark(1_700_000_000_200)]
    assert redis_client.llen(key) == 6


def rounds_of(
    drainer: Drainer, client: redis.Redis, key: str, frames: list[list[bytes]], round_seconds: float
) -> float:
    """Seconds `drain_window` takes over `frames`, one list of them pushed before each round."""
    pending = iter(frames)

    def keep_going() -> bool:
        batch = next(pending, None)
        if batch:
            client.rpush(key, clock_mark(1_700_000_000_000), *batch)
        return batch is not None

    started = time.monotonic()
    drainer.drain_window(keep_going, round_seconds)
    return time.monotonic() - started


def test_rounds_without_a_backlog_start_a_round_interval_apart_and_a_backlog_is_stored_at_once(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    key = push(redis_client, keys, "g1", [])
    drainer = Drainer(redis_client, keys, engine, batch_size=100)
    flushes = [[trade_frame("BTCUSDT", 10 * n + i) for i in range(1, 4)] for n in range(4)]
    assert rounds_of(drainer, redis_client, key, flushes, 0.3) >= 3 * 0.3  # 4 rounds, each after the last's 0.3 s
    # 5 rounds of whole batches (a mark and 99 frames: the acknowledgement puts the mark back)
    backlog = [[trade_frame("BTCUSDT", 1000 + i) for i in range(500)]] + [[]] * 4
    assert rounds_of(drainer, redis_client, key, backlog, 5.0) < 5.0  # no round waited
    assert len(trade_ids(engine)) == 12 + 5 * 99
    drainer.drain(time_budget=30)
    assert len(trade_ids(engine)) == 12 + 500
