"""Gap detection and repair, and history backfill, against the fake exchange (a real
process), a real Redis and a real SQLite file.

Rows are stored from the fake's own REST answers with holes cut into them; after the
repair, the table must hold exactly what the fake publishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from tests.conftest import fake_stats, launch_stack, wait_until
from tests.test_fake_exchange import Fake, running_fake
from tests.test_rest import shared_client, url
from worker.exchange.backfill import Backfiller, HistoryJob
from worker.exchange.gaps import Gap, find_gaps
from worker.exchange.history import Row, agg_trade_row, kline_row, series_for, trade_row
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.store.storage import NOT_RECEIVED, TABLES, create_schema, gaps, make_engine, store_rows

MINUTE = 60_000
HOUR = 60 * MINUTE
NOW_MINUTE = int(time.time() * 1000) // MINUTE * MINUTE
SINCE = NOW_MINUTE - 6 * HOUR  # the default look-back


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    """Five hours of history: trade number n of every symbol at genesis + n/10 s."""
    with running_fake("--genesis-ms", str(NOW_MINUTE - 5 * HOUR)) as fake:
        yield fake


@pytest.fixture
def backfiller(fake: Fake, engine: Engine, redis_client: redis.Redis, keys: RedisKeys) -> Callable[..., Backfiller]:
    """Backfillers as workers build them (the budget in Redis), each with its own client."""

    def make(page_limit: int = 1000) -> Backfiller:
        rest = shared_client(url(fake), redis_client, keys)
        return Backfiller(engine, rest, redis_client, keys, page_limit=page_limit)

    return make


def published(base_url: str, endpoint: str, **params: Any) -> Any:
    """What the exchange at `base_url` answers, asked directly (not through the client)."""
    response = requests.get(f"{base_url}/api/v3/{endpoint}", params=params, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def store(engine: Engine, table: str, rows: list[Row]) -> None:
    with engine.begin() as conn:
        store_rows(conn, {table: rows})


def stored(engine: Engine, table: str, *columns: str) -> list[tuple[Any, ...]]:
    """The columns of every row, ordered by the first column."""
    chosen = [TABLES[table].c[column] for column in columns]
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(select(*chosen).order_by(chosen[0]))]


def gap_records(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        query = select(
            gaps.c.symbol,
            gaps.c.kind,
            gaps.c.first_missing,
            gaps.c.last_missing,
            gaps.c.status,
            gaps.c.rows_fetched,
            gaps.c.reason,
        ).order_by(gaps.c.id)
        return [tuple(row) for row in conn.execute(query)]


def answers_by_status(fake: Fake) -> dict[str, int]:
    return fake.stats()["rest"]["by_status"]


# (REST endpoint, its id, price, qty and time fields, row builder, key column, the fake's
# first id of its first symbol, BTCUSDT)
ID_SERIES = {
    "trade": ("historicalTrades", "id", "price", "qty", "time", trade_row, "trade_id", 1_000_000),
    "aggTrade": ("aggTrades", "a", "p", "q", "T", agg_trade_row, "agg_id", 500_000),
}
HOLES = [(10, 19), (500, 500), (700, 899)]  # offsets into 1000 consecutive ids


@pytest.mark.parametrize("kind", list(ID_SERIES))
def test_id_holes_are_found_and_filled_exactly(
    kind: str, fake: Fake, engine: Engine, backfiller: Callable[..., Backfiller]
) -> None:
    endpoint, id_field, price, qty, when, build, key_column, base = ID_SERIES[kind]
    series = series_for("BTCUSDT", kind)
    first = base + 100_000  # trade number 100000: about 2 h 15 min ago
    truth = published(url(fake), endpoint, symbol="BTCUSDT", fromId=first, limit=1000)
    assert [r[id_field] for r in truth] == list(range(first, first + 1000))
    missing = {first + i for low, high in HOLES for i in range(low, high + 1)}
    store(engine, series.table_name, [build("BTCUSDT", r) for r in truth if r[id_field] not in missing])

    with engine.connect() as conn:
        assert find_gaps(conn, series, SINCE) == [
            Gap("BTCUSDT", kind, first + low, first + high) for low, high in HOLES
        ]
    report = backfiller().repair_recent_gaps([series], SINCE)

    assert report.as_dict() == {
        "gaps_found": 3,
        "filled": 3,
        "unfillable": 0,
        "rows_fetched": len(missing),
        "left_open": 0,
        "stopped": None,
    }
    assert stored(engine, series.table_name, key_column, "price", "qty", "trade_time") == [
        (r[id_field], float(r[price]), float(r[qty]), r[when]) for r in truth
    ]
    assert gap_records(engine) == [
        ("BTCUSDT", kind, first + low, first + high, "filled", high - low + 1, None) for low, high in HOLES
    ]
    again = backfiller().repair_recent_gaps([series], SINCE)
    assert (again.gaps_found, again.filled, again.rows_fetched) == (0, 0, 0)


def test_missing_kline_slots_are_found_and_filled(
    fake: Fake, engine: Engine, backfiller: Callable[..., Backfiller]
) -> None:
    series = series_for("ETHUSDT", "kline_1m")
    start = NOW_MINUTE - 150 * MINUTE
    truth = published(url(fake), "klines", symbol="ETHUSDT", interval="1m", startTime=start, limit=120)
    holes = {5, 6, 7, 60}
    store(engine, "klines", [kline_row("ETHUSDT", "1m", k, NOW_MINUTE) for i, k in enumerate(truth) if i not in holes])

    with engine.connect() as conn:
        assert find_gaps(conn, series, SINCE) == [
            Gap("ETHUSDT", "kline_1m", start + 5 * MINUTE, start + 7 * MINUTE),
            Gap("ETHUSDT", "kline_1m", start + 60 * MINUTE, start + 60 * MINUTE),
        ]
    report = backfiller().repair_recent_gaps([series], SINCE)

    assert (report.gaps_found, report.filled, report.rows_fetched) == (2, 2, 4)
    columns = ("open_time", "close_time", "open", "high", "low", "close", "volume", "trade_count", "is_closed")
    assert stored(engine, "klines", *columns) == [
        (k[0], k[6], float(k[1]), float(k[2]), float(k[3]), float(k[4]), float(k[5]), k[8], True) for k in truth
    ]


def test_a_429_during_repair_is_waited_out(fake: Fake, engine: Engine, backfiller: Callable[..., Backfiller]) -> None:
    series = series_for("SOLUSDT", "trade")
    first = 4_000_000 + 120_000
    truth = published(url(fake), "historicalTrades", symbol="SOLUSDT", fromId=first, limit=100)
    store(engine, "trades", [trade_row("SOLUSDT", r) for r in truth if not 40 <= r["id"] - first < 60])
    before = answers_by_status(fake)
    fake.control("rest_fault", status=429, count=1, retry_after=1)

    report = backfiller().repair_recent_gaps([series], SINCE)

    assert (report.gaps_found, report.filled, report.rows_fetched) == (1, 1, 20)
    after = answers_by_status(fake)
    assert after.get("429", 0) == before.get("429", 0) + 1
    assert "418" not in after
    assert [row[0] for row in stored(engine, "trades", "trade_id")] == [r["id"] for r in truth]


def test_gaps_rest_cannot_fill_are_marked_unfillable_with_the_reason(
    fake: Fake, engine: Engine, backfiller: Callable[..., Backfiller]
) -> None:
    newest = [trade_row("ETHUSDT", r) for r in published(url(fake), "historicalTrades", symbol="ETHUSDT", limit=5)]
    last = newest[-1][1]
    from_the_future = ("ETHUSDT", last + 100_000, *newest[-1][2:])  # an id the fake has not produced
    unlisted = [
        ("NOPEUSDT", 1, 1.0, 1.0, NOW_MINUTE, True, None, *NOT_RECEIVED),
        ("NOPEUSDT", 5, 1.0, 1.0, NOW_MINUTE, True, None, *NOT_RECEIVED),
    ]
    store(engine, "trades", [*newest, from_the_future, *unlisted])

    report = backfiller().repair_recent_gaps([series_for("ETHUSDT", "trade"), series_for("NOPEUSDT", "trade")], SINCE)

    assert (report.gaps_found, report.filled, report.unfillable) == (2, 0, 2)
    (eth, nope) = gap_records(engine)
    assert eth[:5] == ("ETHUSDT", "trade", last + 1, last + 99_999, "unfillable")
    assert eth[6] == (
        f"{99_999 - eth[5]} of 99999 missing trade ids are not available from Binance's REST API "
        f"(it returned {eth[5]} rows); they may not exist yet or may never have existed"
    )
    assert nope[:6] == ("NOPEUSDT", "trade", 2, 4, "unfillable", 0)
    assert nope[6].startswith("Binance refused the request: unknown symbol NOPEUSDT: Binance says 'Invalid symbol.'")


class Interrupted(Exception):
    """Stands for a worker killed in the middle of a job."""


def test_history_of_three_hours_of_klines_resumes_after_an_interruption(
    fake: Fake, engine: Engine, backfiller: Callable[..., Backfiller]
) -> None:
    start = NOW_MINUTE - 4 * HOUR
    job = HistoryJob.checked("bnbusdt", "kline_1m", start, start + 3 * HOUR)

    def interrupt(done: int, total: int, rows: int) -> None:
        raise Interrupted

    before = fake.stats()["rest"]["requests"]
    with pytest.raises(Interrupted):
        backfiller(page_limit=60).history(job, interrupt)
    first_run = fake.stats()["rest"]["requests"] - before
    seen: list[tuple[int, int, int]] = []
    result = backfiller(page_limit=60).history(job, lambda *progress: seen.append(progress))
    second_run = fake.stats()["rest"]["requests"] - before - first_run

    assert result == {
        "symbol": "BNBUSDT",
        "kind": "kline_1m",
        "start": start,
        "end": start + 3 * HOUR,
        "market": "spot",
        "rows": 180,
        "rows_this_run": 120,
        "resumed": True,
        "complete": True,
    }
    # Server time and one page of 60, then server time and the two pages left: from
    # scratch it would have taken server time and three pages.
    assert (first_run, second_run) == (2, 3)
    assert seen == [(2 * HOUR, 3 * HOUR, 120), (3 * HOUR, 3 * HOUR, 180), (3 * HOUR, 3 * HOUR, 180)]
    assert stored(engine, "klines", "open_time", "is_closed") == [
        (t, True) for t in range(start, start + 3 * HOUR, MINUTE)
    ]
    done_before = fake.stats()["rest"]["requests"]
    assert backfiller().history(job)["rows_this_run"] == 0
    assert fake.stats()["rest"]["requests"] == done_before  # a complete job asks nothing


def test_history_of_agg_trades_pages_by_id_and_stops_at_the_end_time(
    fake: Fake, engine: Engine, backfiller: Callable[..., Backfiller]
) -> None:
    start = NOW_MINUTE - 3 * HOUR
    truth = published(url(fake), "aggTrades", symbol="XRPUSDT", startTime=start, endTime=start + MINUTE - 1, limit=1000)
    assert len(truth) == 600  # ten a second

    result = backfiller(page_limit=250).history(HistoryJob.checked("XRPUSDT", "aggTrade", start, start + MINUTE))

    assert (result["rows"], result["complete"]) == (600, True)
    assert stored(engine, "agg_trades", "agg_id", "trade_time") == [(r["a"], r["T"]) for r in truth]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("BTCUSDT", None, 0, 1), "a history backfill needs symbol, kind, start and end"),
        (("BTC USDT", "aggTrade", 0, 1), "'BTC USDT' is not a Binance symbol"),
        (("BTCUSDT", "aggTrade", "0", 1), "start='0' must be a time in ms since the epoch"),
        (("BTCUSDT", "aggTrade", 5, 5), "start=5 must be before end=5"),
        (("BTCUSDT", "nope", 0, 1), "unknown stream kind 'nope'"),
        (("BTCUSDT", "kline_7m", 0, 1), "unknown kline interval '7m'"),
        (("BTCUSDT", "kline_1M", 0, 1), "'kline_1M' cannot be backfilled from REST"),
        (("BTCUSDT", "ticker", 0, 1), "'ticker' cannot be backfilled from REST"),
        (("BTCUSDT", "trade", 0, 1), "'trade' cannot be backfilled by time"),
    ],
)
def test_history_jobs_are_checked_with_clear_errors(arguments: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        HistoryJob.checked(*arguments)


def test_the_task_fills_gaps_from_beat_and_backfills_history_on_demand(tmp_path: Path) -> None:
    """`celery -A worker worker` and `beat` as processes: beat runs tasks.backfill every
    second here, and another application calls it by name for a history range."""
    stack = launch_stack(
        tmp_path / "stack",
        fake_args=["--genesis-ms", str(NOW_MINUTE - 5 * HOUR)],
        env={"BACKFILL_INTERVAL_SECONDS": "1"},
    )
    try:
        start = NOW_MINUTE - 2 * HOUR
        history = client_app(stack.env["REDIS_URL"]).send_task(
            "tasks.backfill", kwargs={"symbol": "BTCUSDT", "kind": "kline_1m", "start": start, "end": start + HOUR}
        )
        assert history.get(timeout=30)["rows"] == 60

        db = make_engine(stack.env["DATABASE_URL"])
        create_schema(db)
        truth = published(stack.env["BINANCE_REST_URL"], "historicalTrades", symbol="ETHUSDT", limit=100)
        first = truth[0]["id"]
        store(db, "trades", [trade_row("ETHUSDT", r) for r in truth if not 10 <= r["id"] - first < 30])
        registry = GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys("recorder"))
        registry.want(Group(id="g-backfill", streams=("ethusdt@trade",)))

        def hole_filled() -> bool:
            return any(g[2] == first + 10 and g[4] == "filled" for g in gap_records(db))

        wait_until(hole_filled, timeout=30, what="beat's backfill to fill the hole")
        with db.connect() as conn:
            stored_ids = (
                conn.execute(
                    text(
                        "select trade_id from trades where symbol = 'ETHUSDT' and trade_id <= :last order by trade_id"
                    ),
                    {"last": truth[-1]["id"]},
                )
                .scalars()
                .all()
            )
        assert stored_ids == [r["id"] for r in truth]
        assert "418" not in fake_stats(stack)["rest"]["by_status"]
    finally:
        stack.stop()
