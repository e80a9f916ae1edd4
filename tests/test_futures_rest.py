"""Futures history, gap repair and open interest from the futures REST APIs, against
the fake exchange (a real process), a real Redis and a real SQLite file.

What lands in the `usdm_`/`coinm_` tables must be exactly what the fake's /fapi and
/dapi publish, asked directly; gaps are recorded per market (`usdm:aggTrade`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import select
from sqlalchemy.engine import Engine

from tests.conftest import clean_env
from tests.test_fake_exchange import Fake, running_fake
from worker.exchange.backfill import Backfiller, HistoryJob, repair_wanted_streams
from worker.exchange.history import NotBackfillable, agg_trade_row
from worker.exchange.open_interest import poll_open_interest
from worker.exchange.rest import BinanceRest
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.settings import Settings
from worker.store.storage import TABLES, create_schema, gaps, make_engine, store_rows

ROOT = Path(__file__).resolve().parents[1]
MINUTE, HOUR = 60_000, 3_600_000
NOW_MINUTE = int(time.time() * 1000) // MINUTE * MINUTE


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with running_fake("--genesis-ms", str(NOW_MINUTE - 5 * HOUR)) as f:
        yield f


@pytest.fixture
def settings(fake: Fake, tmp_path: Path) -> Settings:
    return Settings(
        redis_prefix="test",
        database_url=f"sqlite:///{tmp_path / 'binance.db'}",
        binance_usdm_rest_url=f"http://127.0.0.1:{fake.port}/usdm",
        binance_coinm_rest_url=f"http://127.0.0.1:{fake.port}/coinm",
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    yield engine
    engine.dispose()


def published(settings: Settings, market: str, endpoint: str, **params: Any) -> Any:
    """What the fake answers, asked directly (not through the recorder's client)."""
    base, api = (
        (settings.binance_usdm_rest_url, "/fapi/v1")
        if market == "usdm"
        else (settings.binance_coinm_rest_url, "/dapi/v1")
    )
    response = requests.get(f"{base}{api}/{endpoint}", params=params, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def stored(db: Engine, table: str, *columns: str) -> list[tuple[Any, ...]]:
    chosen = [TABLES[table].c[column] for column in columns]
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(select(*chosen).order_by(*chosen[:2]))]


def history(settings: Settings, client: redis.Redis, db: Engine, job: HistoryJob) -> dict[str, Any]:
    rest = BinanceRest.from_settings(settings, client, job.market)
    return Backfiller(db, rest, client, RedisKeys("test")).history(job)


def test_klines_agg_trades_and_funding_of_both_markets_equal_the_fakes(
    settings: Settings, redis_client: redis.Redis, db: Engine
) -> None:
    start = NOW_MINUTE - 3 * HOUR
    klines = HistoryJob.checked("BTCUSDT", "kline_1m", start, start + 2 * HOUR, "usdm")
    assert history(settings, redis_client, db, klines)["rows"] == 120
    expected = published(settings, "usdm", "klines", symbol="BTCUSDT", interval="1m", startTime=start, limit=120)
    assert stored(db, "usdm_klines", "open_time", "open", "close", "volume") == [
        (k[0], float(k[1]), float(k[4]), float(k[5])) for k in expected
    ]

    trades = HistoryJob.checked("BTCUSD_PERP", "aggTrade", NOW_MINUTE - 11 * MINUTE, NOW_MINUTE - 10 * MINUTE, "coinm")
    result = history(settings, redis_client, db, trades)
    assert result["complete"] and result["market"] == "coinm"
    expected = published(
        settings, "coinm", "aggTrades", symbol="BTCUSD_PERP", startTime=trades.start, endTime=trades.end - 1, limit=1000
    )
    assert len(expected) < 1000  # one answer holds the whole range
    assert stored(db, "coinm_agg_trades", "agg_id", "price", "qty", "trade_time") == [
        (a["a"], float(a["p"]), float(a["q"]), a["T"]) for a in expected
    ]
    assert stored(db, "agg_trades", "agg_id") == []  # spot's table is not the futures'

    three_days = NOW_MINUTE - 72 * HOUR
    for symbol in ("BTCUSDT", "SOLUSDT"):  # funding every 8 h and every 4 h
        funding = HistoryJob.checked(symbol, "fundingRate", three_days, NOW_MINUTE, "usdm")
        history(settings, redis_client, db, funding)
    expected = [
        (f["symbol"], f["fundingTime"], float(f["fundingRate"]), float(f["markPrice"]))
        for symbol in ("BTCUSDT", "SOLUSDT")
        for f in published(settings, "usdm", "fundingRate", symbol=symbol, startTime=three_days, limit=1000)
    ]
    assert len(expected) == 9 + 18
    rows = stored(db, "usdm_funding_rates", "symbol", "funding_time", "funding_rate", "mark_price")
    assert sorted(rows) == sorted(expected)


def test_agg_trades_older_than_48_hours_are_not_asked_for(
    settings: Settings, redis_client: redis.Redis, db: Engine, fake: Fake
) -> None:
    """A week of USDⓈ-M aggTrades would be 168 hourly windows of weight 20 before the
    first row; the futures APIs serve only the last 48 hours, so none before is asked."""
    before = fake.stats()["rest"]["requests"]
    week = HistoryJob.checked("ETHUSDT", "aggTrade", NOW_MINUTE - 7 * 24 * HOUR, NOW_MINUTE - 47 * HOUR, "usdm")
    assert history(settings, redis_client, db, week)["rows"] == 0
    assert fake.stats()["rest"]["requests"] - before <= 3  # server time and the one window left


def test_kinds_futures_rest_cannot_backfill_are_refused_by_name() -> None:
    with pytest.raises(NotBackfillable, match=r"'trade' cannot be backfilled from REST \(usdm\).*need an API key"):
        HistoryJob.checked("BTCUSDT", "trade", 0, 1, "usdm")
    with pytest.raises(NotBackfillable, match="'kline_1s' cannot be backfilled from REST"):
        HistoryJob.checked("BTCUSDT", "kline_1s", 0, 1, "coinm")
    with pytest.raises(NotBackfillable, match="fundingRate is a futures series: give the market, --market usdm"):
        HistoryJob.checked("BTCUSDT", "fundingRate", 0, 1)  # spot has no funding
    with pytest.raises(ValueError, match="unknown market 'futures'"):
        HistoryJob.checked("BTCUSDT", "aggTrade", 0, 1, "futures")


def test_a_hole_in_usdm_agg_trades_is_a_usdm_gap_and_is_filled(
    settings: Settings, redis_client: redis.Redis, db: Engine
) -> None:
    keys = RedisKeys("test")
    GroupRegistry(redis_client, keys).want(Group("gusdm", ("btcusdt@aggTrade",), market="usdm"))
    recent = published(settings, "usdm", "aggTrades", symbol="BTCUSDT", startTime=NOW_MINUTE - 30 * MINUTE, limit=300)
    with db.begin() as conn:  # the recorder stored all but 100 of them
        store_rows(conn, {"usdm_agg_trades": [agg_trade_row("BTCUSDT", a, futures=True) for a in recent[:100]]})
        store_rows(conn, {"usdm_agg_trades": [agg_trade_row("BTCUSDT", a, futures=True) for a in recent[200:]]})
    result = repair_wanted_streams(settings, redis_client, db)
    assert result["usdm"]["gaps_found"] == 1 and result["usdm"]["filled"] == 1 and result["gaps_found"] == 0
    with db.connect() as conn:
        assert conn.execute(select(gaps.c.kind, gaps.c.first_missing, gaps.c.last_missing, gaps.c.status)).all() == [
            ("usdm:aggTrade", recent[100]["a"], recent[199]["a"], "filled")
        ]
    assert stored(db, "usdm_agg_trades", "agg_id") == [(a["a"],) for a in recent]


def test_the_backfill_command_takes_a_market(settings: Settings, redis_url: str, db: Engine) -> None:
    env = clean_env(
        {
            "REDIS_URL": redis_url,
            "DATABASE_URL": settings.database_url,
            "BINANCE_COINM_REST_URL": settings.binance_coinm_rest_url,
        }
    )
    command = [sys.executable, "-m", "worker.ops.cli", "backfill", "ETHUSD_PERP", "fundingRate"]
    done = subprocess.run(
        [*command, "--market", "coinm", "--start", "-2d"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "market=coinm" in done.stdout and "complete=True" in done.stdout
    assert len(stored(db, "coinm_funding_rates", "symbol", "funding_time")) == 12  # every 4 h
    bad = subprocess.run([*command, "--start", "-2d"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: fundingRate is a futures series")
    assert "Traceback" not in bad.stderr


def test_open_interest_of_every_subscribed_futures_symbol_is_polled_into_its_market(
    settings: Settings, redis_client: redis.Redis, db: Engine
) -> None:
    keys = RedisKeys("test")
    registry = GroupRegistry(redis_client, keys)
    registry.want(Group("gspot", ("btcusdt@trade",)))
    spot_only = poll_open_interest(settings, redis_client, lambda: pytest.fail("no database"), unused_client)
    assert spot_only == {}
    registry.want(Group("gusdm", ("btcusdt@aggTrade", "ethusdt@depth@100ms", "!markPrice@arr"), market="usdm"))
    registry.want(Group("gcoinm", ("btcusd_perp@aggTrade",), market="coinm"))
    asked_at = int(time.time() * 1000)
    result = poll_open_interest(
        settings, redis_client, lambda: db, lambda market: BinanceRest.from_settings(settings, redis_client, market)
    )
    assert result == {
        "usdm": {"stored": ["BTCUSDT", "ETHUSDT"], "failed": {}},
        "coinm": {"stored": ["BTCUSD_PERP"], "failed": {}},
    }
    for table, symbols in (("usdm_open_interest", ["BTCUSDT", "ETHUSDT"]), ("coinm_open_interest", ["BTCUSD_PERP"])):
        rows = stored(db, table, "symbol", "time", "open_interest")
        assert [row[0] for row in rows] == symbols
        assert all(asked_at - 1000 <= row[1] <= time.time() * 1000 and row[2] > 0 for row in rows)
    current = published(settings, "coinm", "openInterest", symbol="BTCUSD_PERP")
    assert float(current["openInterest"]) > 0 and current["time"] >= stored(db, "coinm_open_interest", "time")[0][0]


def unused_client(market: str) -> BinanceRest:
    raise AssertionError(f"a {market} client was built although no {market} symbol is subscribed")


def test_beat_polls_open_interest_every_interval() -> None:
    env = clean_env({"OPEN_INTEREST_INTERVAL_SECONDS": "15"})
    code = "import celeryconfig, json; print(json.dumps(celeryconfig.beat_schedule['open-interest']))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"task": "tasks.poll_open_interest", "schedule": 15.0' in done.stdout
