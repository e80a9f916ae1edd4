"""The schedule of depth snapshots for many books: which first, how deep, within the
budget, and when the rest will be synced. The plan in pieces, then `take_snapshots`
against the fake exchange with a real Redis and SQLite file; the whole stack with 150
books is in tests/test_market_books.py."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from tests.test_fake_exchange import running_fake
from worker.exchange.ratelimit import MINUTE_MS, LocalLimitState, RedisLimitState, RequestPacer
from worker.exchange.rest import REST_RULES, SPOT_RULES, BinanceRest
from worker.exchange.snapshots import (
    RATE_MEASURE_GRACE_MS,
    TopBand,
    finish_time,
    plan_snapshots,
    snapshot_limits,
    sync_outlook,
    take_snapshots,
)
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.settings import Settings
from worker.store.books import RESYNCING, SYNCED, BookState
from worker.store.depth import unpack_levels
from worker.store.storage import create_schema, depth_snapshots, make_engine
from worker.streams import USDM

NOW = 1_800_000_030_000  # 30 s into a minute


def snapshot_values(symbol: str, received_at: int) -> dict[str, Any]:
    return {"symbol": symbol, "last_update_id": 1, "bids": b"", "asks": b"", "received_at": received_at}


def book(rate: float, state: str = RESYNCING, last_event: int = NOW - 60_000) -> BookState:
    return BookState(state, last_update_id=1, last_event_time=last_event, updates_per_second=rate)


def test_unknown_books_come_first_the_busiest_first_and_only_the_busiest_are_deep() -> None:
    books = {
        "AAA": book(0.5),
        "BBB": book(9.0),
        "CCC": book(2.0, SYNCED),
        "DDD": book(4.0),
        "EEE": book(0.0, last_event=NOW - 1000),  # seen once, a second ago: no rate yet
        "FFF": book(0.0),  # seen once, a minute ago: a quiet book
        "GGG": book(7.0, SYNCED),
    }
    settings = Settings(depth_snapshot_deep_books=3, depth_snapshot_limit=1000)
    plan = plan_snapshots(books, {"AAA", "BBB", "DDD", "EEE", "FFF"}, {"CCC", "GGG"}, settings, SPOT_RULES, NOW)
    # Unknown books by rate, then the known ones due for a refresh; the 3 busiest of all
    # (BBB 9, GGG 7, DDD 4) are deep, the rest at 100 levels, weight 5.
    assert [(p.symbol, p.limit, p.weight) for p in plan] == [
        ("BBB", 1000, 50),
        ("DDD", 1000, 50),
        ("AAA", 100, 5),
        ("FFF", 100, 5),
        ("GGG", 1000, 50),
        ("CCC", 100, 5),
    ]
    later = plan_snapshots(books, {"EEE"}, set(), settings, SPOT_RULES, NOW + RATE_MEASURE_GRACE_MS)
    assert [p.symbol for p in later] == ["EEE"]  # no rate after the grace: a quiet book
    # A known book whose top is leaving its snapshot's band comes before those due by age.
    running = plan_snapshots(books, {"BBB"}, {"CCC", "GGG"}, settings, SPOT_RULES, NOW, leaving={"CCC"})
    assert [p.symbol for p in running] == ["BBB", "CCC", "GGG"]


def test_the_thin_depth_is_the_cheapest_weight_of_the_market() -> None:
    books = {"A": book(3.0), "B": book(1.0)}
    deep_one = Settings(depth_snapshot_deep_books=1)
    assert snapshot_limits(books, deep_one, SPOT_RULES) == {"A": 1000, "B": 100}
    assert snapshot_limits(books, deep_one, REST_RULES[USDM]) == {"A": 1000, "B": 50}  # weight 2 on futures
    assert snapshot_limits(books, Settings(depth_snapshot_deep_books=0, depth_snapshot_limit=20), SPOT_RULES) == {
        "A": 20,
        "B": 20,
    }


def test_the_finish_time_spends_the_weight_at_the_budget_after_this_minutes_rest() -> None:
    minute = NOW - NOW % MINUTE_MS
    assert finish_time(500, used=2000, budget=3000, now=NOW) == NOW  # this minute holds it
    assert finish_time(1500, used=2000, budget=3000, now=NOW) == minute + MINUTE_MS
    # The whole market at the default budget: 100 deep and 1,400 thin books, 12,000 weight.
    assert finish_time(100 * 50 + 1400 * 5, used=0, budget=3000, now=NOW) == minute + 3 * MINUTE_MS
    assert finish_time(1500 * 50, used=0, budget=3000, now=NOW) == minute + 24 * MINUTE_MS  # all at 1000 levels


def test_the_pacer_has_room_only_for_what_it_would_send_without_waiting() -> None:
    clock = [NOW / 1000]
    pacer = RequestPacer(LocalLimitState(), budget_per_minute=100, clock=lambda: clock[0])
    assert pacer.has_room(250)  # an empty minute admits a request heavier than the budget
    pacer.before_request(50)
    assert pacer.has_room(50) and not pacer.has_room(51)
    pacer.block("backoff", 5)
    assert not pacer.has_room(1)
    clock[0] += 6
    assert pacer.has_room(50)


@pytest.fixture
def fake_url() -> object:
    with running_fake() as fake:
        yield f"http://127.0.0.1:{fake.port}"


def test_a_run_takes_the_busiest_books_this_minute_holds_and_leaves_the_rest_queued(
    redis_client: redis.Redis, keys: RedisKeys, tmp_path: Path, fake_url: str
) -> None:
    symbols = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "LTCUSDT"]
    rates = dict(zip(symbols, [9.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], strict=True))
    GroupRegistry(redis_client, keys).want(Group("g1", tuple(f"{s.lower()}@depth@100ms" for s in symbols)))
    for symbol, rate in rates.items():
        redis_client.hset(keys.book(symbol), mapping=book(rate, last_event=NOW).as_fields())
    redis_client.sadd(keys.books(), *symbols)
    redis_client.sadd(keys.books_needing_snapshot(), *symbols)
    engine = make_engine(f"sqlite:///{tmp_path / 'books.db'}")
    create_schema(engine)
    settings = Settings(
        redis_prefix=keys.prefix,
        binance_rest_url=fake_url,
        depth_snapshot_deep_books=2,
        rest_weight_budget_per_minute=120,
    )
    # The minute stands still, so the run cannot spill into the next one's budget.
    frozen = RequestPacer(RedisLimitState(redis_client, keys), 120, clock=lambda: NOW / 1000)
    rest = BinanceRest(fake_url, pacer=frozen)

    outlook = sync_outlook(settings, redis_client, keys, "spot", NOW)
    assert (outlook.books, outlook.synced, outlook.waiting_weight) == (8, 0, 2 * 50 + 6 * 5)
    assert outlook.rest_by == NOW - NOW % MINUTE_MS + MINUTE_MS  # 130 weight: 10 more than a minute's 120

    lost_lock = take_snapshots(settings, redis_client, lambda: engine, rest, still_mine=lambda: False)
    assert lost_lock == {"stored": [], "failed": {}, "waiting": 8}  # another run holds the lock now
    done = take_snapshots(settings, redis_client, lambda: engine, rest)
    # 50 + 50 + 4 x 5 = 120: the two busiest deep, then four thin ones, by rate.
    assert done == {"stored": symbols[:6], "failed": {}, "waiting": 2}
    assert frozen.used_this_minute() == 120
    assert {s.decode() for s in redis_client.smembers(keys.books_needing_snapshot())} == set(symbols[6:])
    with engine.connect() as conn:
        levels = {
            symbol: len(unpack_levels(bids))
            for symbol, bids in conn.execute(select(depth_snapshots.c.symbol, depth_snapshots.c.bids))
        }
    # Asked for 1000 levels, the fake's books answer all their bids (hundreds); 100 when asked for 100.
    assert levels["BTCUSDT"] > 100 and levels["ETHUSDT"] > 100
    assert {symbol: levels[symbol] for symbol in symbols[2:6]} == dict.fromkeys(symbols[2:6], 100)
    assert take_snapshots(settings, redis_client, lambda: engine, rest) == {"stored": [], "failed": {}, "waiting": 2}
    outlook = sync_outlook(settings, redis_client, keys, "spot", NOW)
    assert outlook.waiting_weight == 2 * 5  # the six taken wait for the drain, not for weight
    assert outlook.rest_by == NOW - NOW % MINUTE_MS + MINUTE_MS


def test_band_refreshes_spend_half_the_minute_and_leave_the_rest_to_refreshes_by_age(
    redis_client: redis.Redis, keys: RedisKeys, tmp_path: Path, fake_url: str
) -> None:
    running, aged = ["BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT"], "XRPUSDT"
    symbols = [*running, aged]
    GroupRegistry(redis_client, keys).want(Group("g1", tuple(f"{s.lower()}@depth@100ms" for s in symbols)))
    for rate, symbol in enumerate(reversed(symbols), start=1):  # BTCUSDT the busiest, XRPUSDT the quietest
        state = dataclasses.replace(book(float(rate), SYNCED, last_event=NOW), bid_seen=2.0)
        redis_client.hset(keys.book(symbol), mapping=state.as_fields())
        redis_client.hset(
            keys.book_bands(), symbol, TopBand(below=0.5, above=2.0 if symbol in running else 3.0).encode()
        )
    redis_client.sadd(keys.books(), *symbols)
    engine = make_engine(f"sqlite:///{tmp_path / 'books.db'}")
    create_schema(engine)
    now = int(time.time() * 1000)
    with engine.begin() as conn:
        received = {**dict.fromkeys(running, now - 60_000), "SOLUSDT": now - 1_000, aged: 0}
        conn.execute(depth_snapshots.insert(), [snapshot_values(s, at) for s, at in received.items()])
    settings = Settings(
        redis_prefix=keys.prefix,
        binance_rest_url=fake_url,
        depth_snapshot_deep_books=0,
        rest_weight_budget_per_minute=20,
    )
    frozen = RequestPacer(RedisLimitState(redis_client, keys), 20, clock=lambda: NOW / 1000)
    done = take_snapshots(settings, redis_client, lambda: engine, BinanceRest(fake_url, pacer=frozen))
    # Weight 5 each: two band refreshes are half of 20, the third is skipped, the one due by
    # age still fits; SOLUSDT's snapshot is a second old, too recent for a band refresh.
    assert done == {"stored": ["BTCUSDT", "ETHUSDT", aged], "failed": {}, "waiting": 1}
