"""A drain run's cache of the book states it saved (`BookCache`) and its `stored_at`
marks at most once a second per symbol: real redis, real SQLite file, the real Drainer."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from tests.test_books import SYMBOL, T0, event
from worker.buffer import FrameBuffer, clock_mark
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.store import drain as drain_module
from worker.store.books import RESYNCING, SYNCED, BookCache, BookState, FollowedBooks, follow_books
from worker.store.drain import Drainer, stored_at_field
from worker.store.storage import create_schema, gaps, make_engine, store_rows


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'books.db'}")
    create_schema(engine)
    return engine


def drain(engine: Engine, client: redis.Redis, keys: RedisKeys, cache: BookCache, rows: list[tuple]) -> str:
    """One round's book work as the Drainer does it: follow in the transaction, save after it."""
    with engine.begin() as conn:
        store_rows(conn, {"depth_updates": rows})
        followed = follow_books(conn, client, keys, rows, T0, cache=cache)
    cache.save(client, keys, followed)
    return followed.states[SYMBOL]


def overwrite_unseen(client: redis.Redis, keys: RedisKeys, last_update_id: int) -> None:
    """Change the stored state without counting a save: only a cache that reads Redis sees it."""
    client.hset(keys.book(SYMBOL), "last_update_id", str(last_update_id))


def gap_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(gaps)) or 0)


def test_a_run_reads_back_none_of_the_states_it_saved(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    cache = BookCache()
    drain(engine, redis_client, keys, cache, [event(1, 3)])
    overwrite_unseen(redis_client, keys, 100)
    assert cache.states(redis_client, keys, [SYMBOL])[SYMBOL].last_update_id == 3  # its own, not Redis's
    assert BookCache().states(redis_client, keys, [SYMBOL])[SYMBOL].last_update_id == 100  # a new run reads


def test_another_writers_save_makes_the_run_read_the_states_again(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    mine, other = BookCache(), BookCache()
    drain(engine, redis_client, keys, mine, [event(1, 3)])
    drain(engine, redis_client, keys, other, [event(4, 6)])  # another lane met this one on the list
    assert mine.states(redis_client, keys, [SYMBOL])[SYMBOL].last_update_id == 6
    # The events continue the other run's state: no false break.
    drain(engine, redis_client, keys, mine, [event(7, 8)])
    assert BookState.load(redis_client, keys, SYMBOL).last_update_id == 8
    assert gap_count(engine) == 0


def test_a_save_between_the_runs_own_saves_leaves_only_its_latest_states_cached(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    mine, other = BookCache(), BookCache()
    drain(engine, redis_client, keys, mine, [event(1, 3)])
    other_book = FollowedBooks({"ETHUSDT": BookState(state=SYNCED, last_update_id=50)}, [])
    mine_again = FollowedBooks({"ETHUSDT": BookState(state=SYNCED, last_update_id=60)}, [])
    other.save(redis_client, keys, other_book)  # after this run's read, before its save
    mine.save(redis_client, keys, mine_again)
    overwrite_unseen(redis_client, keys, 100)
    states = mine.states(redis_client, keys, [SYMBOL, "ETHUSDT"])
    assert states["ETHUSDT"].last_update_id == 60  # saved by this save: still Redis's
    assert states[SYMBOL].last_update_id == 100  # cached before the other save: read again


def test_redis_losing_its_data_empties_the_cache(engine: Engine, redis_client: redis.Redis, keys: RedisKeys) -> None:
    cache = BookCache()
    drain(engine, redis_client, keys, cache, [event(1, 3)])
    redis_client.flushdb()
    assert cache.states(redis_client, keys, [SYMBOL])[SYMBOL] == BookState()


def test_a_failed_round_changes_no_cached_state(engine: Engine, redis_client: redis.Redis, keys: RedisKeys) -> None:
    cache = BookCache()
    drain(engine, redis_client, keys, cache, [event(1, 3)])
    with pytest.raises(RuntimeError), engine.begin() as conn:
        follow_books(conn, redis_client, keys, [event(8, 9)], T0, cache=cache)  # 4 to 7 lost
        raise RuntimeError("the commit fails")
    state = cache.states(redis_client, keys, [SYMBOL])[SYMBOL]
    assert (state.state, state.last_update_id) == (RESYNCING, 3)  # as saved: never synced, no break seen
    assert drain(engine, redis_client, keys, cache, [event(8, 9)]) == RESYNCING  # the retry sees it
    assert BookState.load(redis_client, keys, SYMBOL).resync_from == 7


def test_a_failed_save_makes_the_run_read_the_states_again(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = BookCache()
    drain(engine, redis_client, keys, cache, [event(1, 3)])

    def failing_save(*_: object, **__: object) -> int:
        raise redis.ConnectionError("Redis went away")

    with monkeypatch.context() as patched:
        patched.setattr(FollowedBooks, "save", failing_save)
        with pytest.raises(redis.ConnectionError):
            drain(engine, redis_client, keys, cache, [event(4, 5)])
    overwrite_unseen(redis_client, keys, 100)
    assert cache.states(redis_client, keys, [SYMBOL])[SYMBOL].last_update_id == 100


GROUP = Group("g1", ("btcusdt@trade",))


def trade_frame(trade_id: int) -> bytes:
    data = {"e": "trade", "E": T0, "s": SYMBOL, "t": trade_id, "p": "1.0", "q": "1.0", "T": T0, "m": True}
    return orjson.dumps({"stream": "btcusdt@trade", "data": data})


def test_a_run_marks_a_symbols_stored_at_at_most_once_a_second(
    engine: Engine, redis_client: redis.Redis, keys: RedisKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    GroupRegistry(redis_client, keys).want(GROUP)
    key = FrameBuffer(redis_client, keys).register(GROUP.id)
    drainer = Drainer(redis_client, keys, engine, batch_size=100)
    field = stored_at_field("trades", SYMBOL)
    for trade_id, now in ((1, T0), (2, T0 + 999), (3, T0 + 1000)):
        monkeypatch.setattr(drain_module, "now_ms", lambda now=now: now)
        redis_client.rpush(key, clock_mark(now), trade_frame(trade_id))
        assert drainer.drain(time_budget=10).rows["trades"] == 1
        assert int(redis_client.hget(keys.stored_at, field) or 0) == {1: T0, 2: T0, 3: T0 + 1000}[trade_id]
