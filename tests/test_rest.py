"""The REST client against the fake exchange (a real process) and a real Redis: the shared
weight budget, 429 back-offs, 418 bans, retries and Binance's errors.

Tests that change the fake's server-wide state (faults, bans, weight counts they rely
on) start their own fake.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from tests.test_fake_exchange import Fake, running_fake
from worker.exchange.ratelimit import LocalLimitState, RedisLimitState, RequestPacer, RestUnavailable
from worker.exchange.rest import BinanceError, BinanceRest, UnknownSymbol
from worker.keys import RedisKeys


@pytest.fixture(scope="module")
def shared_fake() -> Iterator[Fake]:
    with running_fake() as fake:
        yield fake


@pytest.fixture
def own_fake() -> Iterator[Fake]:
    with running_fake() as fake:
        yield fake


def url(fake: Fake) -> str:
    return f"http://127.0.0.1:{fake.port}"


def shared_client(base_url: str, client: redis.Redis, keys: RedisKeys, **pacer: Any) -> BinanceRest:
    """A client whose limits live in Redis, as every worker's do."""
    return BinanceRest(base_url, timeout=5, pacer=RequestPacer(RedisLimitState(client, keys), **pacer))


@dataclass
class FakeClock:
    """A clock that only moves when slept on, so a minute-long wait takes no time."""

    now: float
    sleeps: list[float] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def wait_for_a_fresh_minute_stretch(seconds: float = 3.0) -> None:
    """Avoid starting a check that must stay within one UTC minute just before it ends."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.05)


def test_the_used_weight_header_raises_the_shared_count(
    shared_fake: Fake, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    rest = shared_client(url(shared_fake), redis_client, keys)
    wait_for_a_fresh_minute_stretch()
    for _ in range(3):  # another user of the IP spends 60 weight behind our back
        assert shared_fake.get("/api/v3/exchangeInfo?symbol=BTCUSDT")[0] == 200
    rest.klines("BTCUSDT", "1m", limit=1)
    used_at_binance = shared_fake.stats()["rest"]["weight_used_this_minute"]
    assert used_at_binance >= 62
    assert rest.pacer.used_this_minute() == used_at_binance
    assert int(redis_client.get(keys.rest_weight(int(time.time()) // 60))) == used_at_binance


def test_a_spent_budget_waits_for_the_next_minute(own_fake: Fake, redis_client: redis.Redis, keys: RedisKeys) -> None:
    clock = FakeClock(now=1_800_000_000 // 60 * 60 + 50.0)  # 10 s before a minute ends
    rest = shared_client(url(own_fake), redis_client, keys, budget_per_minute=5, clock=clock.time, sleep=clock.sleep)
    for _ in range(3):  # klines weigh 2: the third one does not fit into 5
        assert len(rest.klines("BTCUSDT", "1m", limit=1)) == 1
    assert clock.sleeps == [10.0]
    assert own_fake.stats()["rest"]["by_status"] == {"200": 3}


def test_a_429_makes_every_worker_wait_retry_after(own_fake: Fake, redis_client: redis.Redis, keys: RedisKeys) -> None:
    """Worker A is told 429 Retry-After 1; worker B, asking while A waits, must wait too:
    the fake bans (418) any request that comes before Retry-After has passed."""
    a_waits = threading.Event()

    def sleep_and_tell(seconds: float) -> None:
        a_waits.set()
        time.sleep(seconds)

    worker_a = shared_client(url(own_fake), redis_client, keys, max_wait_seconds=5, sleep=sleep_and_tell)
    worker_b = shared_client(url(own_fake), redis_client, keys, max_wait_seconds=5)
    own_fake.control("rest_fault", status=429, count=1, retry_after=1)
    results: dict[str, Any] = {}
    started = time.monotonic()
    thread = threading.Thread(target=lambda: results.update(a=worker_a.klines("BTCUSDT", "1m", limit=1)))
    thread.start()
    assert a_waits.wait(5)
    results["b"] = worker_b.klines("BTCUSDT", "1m", limit=1)
    b_done = time.monotonic() - started
    thread.join(10)
    assert time.monotonic() - started >= 1.0 and b_done >= 1.0
    assert len(results["a"]) == len(results["b"]) == 1
    assert own_fake.stats()["rest"]["by_status"] == {"429": 1, "200": 2}


def test_a_short_ban_is_waited_out(own_fake: Fake, redis_client: redis.Redis, keys: RedisKeys) -> None:
    rest = shared_client(url(own_fake), redis_client, keys, max_wait_seconds=5)
    own_fake.control("rest_fault", status=418, count=1, retry_after=1)
    started = time.monotonic()
    assert rest.symbol_statuses(["BTCUSDT"]) == {"BTCUSDT": "TRADING"}
    assert time.monotonic() - started >= 1.0
    assert own_fake.stats()["rest"]["by_status"] == {"418": 1, "200": 1}


def test_a_ban_longer_than_the_max_wait_fails_every_worker_at_once(
    own_fake: Fake, redis_client: redis.Redis, keys: RedisKeys
) -> None:
    own_fake.control("rest_fault", status=418, count=1, retry_after=600)
    started = time.monotonic()
    with pytest.raises(
        RestUnavailable,
        match=r"banned this IP \(HTTP 418\) until .* UTC, 600 s from now, "
        r"longer than REST_MAX_WAIT_SECONDS=300; retry after that time",
    ):
        shared_client(url(own_fake), redis_client, keys).klines("BTCUSDT", "1m")
    other_worker = shared_client(url(own_fake), redis_client, keys)
    with pytest.raises(RestUnavailable, match="banned this IP"):
        other_worker.agg_trades("BTCUSDT")
    assert time.monotonic() - started < 2
    assert own_fake.stats()["rest"]["requests"] == 1  # the other worker sent nothing


def test_an_unknown_symbol_is_named(shared_fake: Fake) -> None:
    rest = BinanceRest(url(shared_fake))  # no Redis: a process-local budget
    with pytest.raises(UnknownSymbol, match=r"unknown symbol NOPEUSDT: Binance says 'Invalid symbol\.'"):
        rest.symbol_statuses(["BTCUSDT", "NOPEUSDT"])
    unknown = [f"NOPE{i}USDT" for i in range(3000)]
    with pytest.raises(UnknownSymbol, match=r"^3000 unknown symbols: NOPE0USDT, NOPE1USDT, .*, NOPE2999USDT: Binance"):
        rest.symbol_statuses(["ETHUSDT", *unknown])
    with pytest.raises(UnknownSymbol, match="unknown symbol NOPEUSDT"):
        rest.klines("NOPEUSDT", "1m")


def test_other_refusals_raise_binance_error_with_code_and_message(shared_fake: Fake) -> None:
    with pytest.raises(BinanceError) as refused:
        BinanceRest(url(shared_fake)).klines("BTCUSDT", "7m")
    assert (refused.value.status, refused.value.code, refused.value.msg) == (400, -1120, "Invalid interval.")


def test_timeouts_are_retried_with_exponential_back_off_then_fail_clearly() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        clock = FakeClock(now=time.time())
        pacer = RequestPacer(LocalLimitState(), clock=clock.time, sleep=clock.sleep)
        rest = BinanceRest(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.05, pacer=pacer)
        with pytest.raises(RestUnavailable, match=r"api/v3/ping failed 5 times, last with ReadTimeout"):
            rest.get("ping")
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]
