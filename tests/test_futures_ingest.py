"""Recording the futures markets end to end: `subscribe --market usdm|coinm` through the
CLI, streams on the route that carries them, rows in the markets' tables, `status` per
market, a silent futures stream reported, and a delivery contract that settles stopped
and said so (real stack: Redis, the fake exchange's /usdm and /coinm, workers, beat,
SQLite)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.conftest import call, cli, launch_stack, status_command, wait_until
from tests.test_metrics import collect
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_stack import LocalStack
from worker.settings import Settings, get_settings
from worker.store.storage import TABLE_COLUMNS

STALE_SECONDS = 3
USDM_STREAMS = "aggTrade,markPrice,forceOrder,bookTicker,depth@100ms"
USDM_TABLES = ("usdm_agg_trades", "usdm_mark_prices", "usdm_book_tickers", "usdm_depth_updates", "usdm_liquidations")
COINM_TABLES = ("coinm_agg_trades", "coinm_depth_updates")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(
        tmp_path_factory.mktemp("futures"),
        env={
            "STALE_STREAM_SECONDS": str(STALE_SECONDS),
            "LISTING_REFRESH_SECONDS": "1",
            "OPEN_INTEREST_INTERVAL_SECONDS": "1",
        },
        stream_concurrency=6,
    )
    yield stack
    stack.stop()


def rows(db: Engine, table: str, where: str = "") -> int:
    with db.connect() as conn:
        return int(conn.execute(text(f"select count(*) from {table} {where}")).scalar_one())


def futures_control(stack: LocalStack, market: str, action: str, **fields: object) -> dict[str, Any]:
    url = f"{stack.env[f'BINANCE_{market.upper()}_REST_URL']}/fake/control"
    response = requests.post(url, json={"action": action, **fields}, timeout=5)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def progress_of(stack: LocalStack, stream: str) -> dict[str, Any]:
    """The progress the recording task of `stream`'s group last reported (what Flower shows)."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    keys = RedisKeys(get_settings().redis_prefix)
    (group,) = [g for g in GroupRegistry(client, keys).wanted().values() if stream in g.streams]
    task_id = GroupRegistry(client, keys).status(group.id)["task_id"]
    info = client_app(stack.env["REDIS_URL"]).AsyncResult(task_id).info
    return info if isinstance(info, dict) else {}


def test_usdm_and_coinm_streams_fill_their_tables_beside_spot(stack: LocalStack, db: Engine) -> None:
    usdm = cli(stack, "subscribe", "BTCUSDT", "--market", "usdm", "--streams", USDM_STREAMS)
    assert usdm.returncode == 0, usdm.stderr
    usdm_result = json.loads(usdm.stdout)
    assert usdm_result["market"] == "usdm" and usdm_result["symbols"] == {"BTCUSDT": "TRADING"}
    # /public carries the book and bookTicker, /market the rest: two connections.
    assert len(usdm_result["new_groups"]) == 2
    coinm = cli(stack, "subscribe", "BTCUSD_PERP", "--market", "coinm", "--streams", "aggTrade,depth@100ms")
    assert coinm.returncode == 0, coinm.stderr
    assert len(json.loads(coinm.stdout)["new_groups"]) == 1  # COIN-M has one route
    # The same stream name on spot is another group: ids never collide across markets.
    spot = call(stack, "tasks.subscribe", ["BTCUSDT"], ["aggTrade"])
    assert not set(spot["groups"]) & set(usdm_result["groups"])

    for table in (*USDM_TABLES, *COINM_TABLES, "agg_trades"):
        wait_until(lambda table=table: rows(db, table), 60, f"rows in {table}")  # type: ignore[misc]
    with db.connect() as conn:
        for table, symbol in (("usdm_agg_trades", "BTCUSDT"), ("coinm_agg_trades", "BTCUSD_PERP")):
            first, last, count, distinct = conn.execute(
                text(
                    f"select min(agg_id), max(agg_id), count(*), count(distinct agg_id) from {table} where symbol = :s"
                ),
                {"s": symbol},
            ).one()
            assert count == distinct == last - first + 1, (table, first, last, count)
        # Every futures row is its market's: nothing of BTCUSD_PERP in USDⓈ-M's tables or the reverse.
        assert rows(db, "usdm_agg_trades", "where symbol = 'BTCUSD_PERP'") == 0
        assert rows(db, "coinm_agg_trades", "where symbol = 'BTCUSDT'") == 0

    done = wait_until(lambda: (d := status_command(stack)).returncode == 0 and d, 30, "status to be healthy")
    group_lines = [line.split() for line in done.stdout.splitlines() if line.startswith("g")]
    assert {line[1] for line in group_lines} == {"spot", "usdm", "coinm"}, done.stdout
    only_coinm = json.loads(status_command(stack, "--json", "--market", "coinm").stdout)
    assert [(g["market"], g["symbols"]) for g in only_coinm["groups"]] == [("coinm", ["BTCUSD_PERP"])]

    gone = cli(stack, "unsubscribe", "BTCUSD_PERP", "--market", "coinm")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["stopped"] == [only_coinm["groups"][0]["id"]]
    remaining = json.loads(status_command(stack, "--json").stdout)["groups"]
    assert sorted(g["market"] for g in remaining) == ["spot", "usdm", "usdm"]
    # Unsubscribing BTCUSDT on spot leaves USDⓈ-M's BTCUSDT recording.
    call(stack, "tasks.unsubscribe", ["BTCUSDT"])
    assert sorted(g["market"] for g in json.loads(status_command(stack, "--json").stdout)["groups"]) == ["usdm", "usdm"]
    before = rows(db, "usdm_agg_trades")
    wait_until(lambda: rows(db, "usdm_agg_trades") > before, 30, "USDⓈ-M trades to go on")


def test_futures_books_sync_from_beats_snapshots_and_open_interest_is_polled(stack: LocalStack, db: Engine) -> None:
    """Beat's snapshot task fetches the futures books' snapshots from /fapi and /dapi, the
    drain syncs them by `pu`, `book --market` rebuilds the fake's book, and beat's open
    interest poll fills each market's table."""
    call(stack, "tasks.subscribe", ["SOLUSDT"], ["depth@100ms"], market="usdm")
    call(stack, "tasks.subscribe", ["ETHUSD_PERP"], ["depth@100ms"], market="coinm")

    def books() -> dict[tuple[str, str], str]:
        done = status_command(stack, "--json")
        return {(b["market"], b["symbol"]): b["state"] for b in json.loads(done.stdout)["books"]}

    wanted = {("usdm", "SOLUSDT"): "synced", ("coinm", "ETHUSD_PERP"): "synced"}
    wait_until(lambda: wanted.items() <= books().items(), 40, "both futures books synced")
    for market, symbol in (("usdm", "SOLUSDT"), ("coinm", "ETHUSD_PERP")):
        args = ("book", symbol, "--market", market, "--at", "-1s", "--levels", "50", "--json")
        # -1s may still be before the first event on the snapshot the book synced on.
        done = wait_until(lambda: (d := cli(stack, *args)).returncode == 0 and d, 20, f"{symbol}'s book")  # noqa: B023
        book = json.loads(done.stdout)
        base = stack.env[f"BINANCE_{market.upper()}_REST_URL"]
        truth = requests.get(f"{base}/fake/book", params={"symbol": symbol, "update_id": book["update_id"]}, timeout=5)
        for side in ("bids", "asks"):
            assert book[side] == [[float(p), float(q)] for p, q in truth.json()[side][:50]], (symbol, side)
    wait_until(lambda: rows(db, "usdm_open_interest", "where symbol = 'SOLUSDT'") >= 2, 30, "two open interest polls")
    wait_until(lambda: rows(db, "coinm_open_interest", "where symbol = 'ETHUSD_PERP'"), 30, "COIN-M open interest")


def test_a_silent_usdm_stream_is_reported_by_status_and_in_the_task_progress(stack: LocalStack, db: Engine) -> None:
    call(stack, "tasks.subscribe", ["ETHUSDT"], ["aggTrade", "markPrice"], market="usdm")
    stream = "ethusdt@markPrice"
    wait_until(lambda: rows(db, "usdm_mark_prices", "where symbol = 'ETHUSDT'"), 30, "ETHUSDT mark prices")
    futures_control(stack, "usdm", "mute_stream", stream=stream, seconds=120)
    try:
        done = wait_until(
            lambda: (d := status_command(stack)).returncode == 1 and f"stream {stream} " in d.stdout and d,
            30,
            f"status to warn about {stream}",
        )
        (problem,) = [line for line in done.stdout.splitlines() if stream in line]
        assert "of usdm group" in problem and "while its connection is up" in problem, problem
        # Flower shows it too: the recording task's progress names the silent stream.
        wait_until(lambda: stream in progress_of(stack, stream).get("silent_streams", {}), 15, "the task's report")
        # And /metrics: the stream's silence and the flag status's warning follows.
        page = scrape_of(stack, db)
        assert page.by("binance_recorder_stream_silent", "stream")[stream] == 1
        assert page.by("binance_recorder_stream_stored_age_seconds", "stream")[stream] > STALE_SECONDS
    finally:
        futures_control(stack, "usdm", "mute_stream", stream=stream, seconds=0)
    wait_until(lambda: status_command(stack).returncode == 0, 30, f"status healthy once {stream} stores again")
    wait_until(
        lambda: scrape_of(stack, db).by("binance_recorder_stream_silent", "stream")[stream] == 0,
        30,
        f"/metrics to clear {stream}",
    )


def scrape_of(stack: LocalStack, db: Engine) -> Any:
    """What /metrics shows of this stack now (the exporter's collector, without its HTTP server)."""
    return collect(Settings.from_env(stack.env), redis.Redis.from_url(stack.env["REDIS_URL"]), db)


def test_a_settling_delivery_contract_is_stopped_and_recorded(stack: LocalStack, db: Engine) -> None:
    info = requests.get(f"{stack.env['BINANCE_USDM_REST_URL']}/fapi/v1/exchangeInfo", timeout=5).json()
    (contract,) = [s["symbol"] for s in info["symbols"] if s["contractType"] == "CURRENT_QUARTER"]
    # `!contractInfo` rides the aggTrade's /market connection: live once its trades are stored.
    # With BTCUSDT, so that its groups hold a symbol that goes on, whatever ran before.
    subscribed = cli(
        stack, "subscribe", contract, "BTCUSDT", "--market", "usdm", "--streams", "aggTrade,depth@100ms,!contractInfo"
    )
    assert subscribed.returncode == 0, subscribed.stderr
    result = json.loads(subscribed.stdout)
    assert "!contractInfo" in result["streams"]
    where = f"where symbol = '{contract}'"
    wait_until(lambda: rows(db, "usdm_agg_trades", where), 30, f"{contract} trades")

    futures_control(stack, "usdm", "settle", symbol=contract, delist_after_seconds=600)

    def stopped() -> list[Any]:
        with db.connect() as conn:
            return list(conn.execute(text(f"select market, old_status, new_status from listing_changes {where}")))

    wait_until(lambda: rows(db, "usdm_contract_info", f"{where} and status = 'DELIVERING'"), 15, "contractInfo")
    changes = wait_until(stopped, 30, f"a listing change of {contract}")
    assert [tuple(change) for change in changes][0] == ("usdm", "TRADING", "DELIVERING")
    groups = json.loads(status_command(stack, "--json").stdout)["groups"]
    # Its groups go on without it.
    held = [g for g in groups if g["id"] in result["groups"]]
    assert held and all(contract not in g["symbols"] and g["symbols"] for g in held), groups
    shown = status_command(stack).stdout
    assert f"usdm {contract}: TRADING -> DELIVERING at " in shown and "its streams were stopped" in shown
    # Subscribing it again is refused: it streams nothing.
    again = cli(stack, "subscribe", contract, "--market", "usdm", "--streams", "aggTrade")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert f"{contract} is " in again.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("subscribe", "BTCUSDT", "--market", "options"),
            "error: unknown market 'options': use one of spot, usdm, coinm",
        ),
        (("unsubscribe", "BTCUSDT", "--market", "usd-m"), "error: unknown market 'usd-m'"),
        (("status", "--market", "eurm"), "error: unknown market 'eurm'"),
        (("subscribe", "BTCUSDT", "--market", "coinm"), "error: unknown symbol BTCUSDT on coinm: Binance says"),
        (("subscribe", "BTCUSDT", "--market", "usdm", "--streams", "avgPrice"), "unknown stream kind 'avgPrice'"),
        (("subscribe", "BTCUSD_PERP", "--market", "spot"), "error: unknown symbol BTCUSD_PERP: Binance says"),
    ],
)
def test_bad_market_symbol_or_kind_is_one_line_and_exit_2(
    stack: LocalStack, args: tuple[str, ...], expected: str
) -> None:
    done = cli(stack, *args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr, done.stderr


def test_export_chart_and_metrics_know_the_futures_markets(stack: LocalStack, db: Engine, tmp_path: Path) -> None:
    """`export` and `chart --market` read the market's tables (a futures book rebuilt by
    `pu`, liquidations said to be a sample), and /metrics labels books by market."""
    call(stack, "tasks.subscribe", ["DOGEUSDT"], ["aggTrade", "markPrice", "forceOrder", "depth@100ms"], market="usdm")
    call(stack, "tasks.subscribe", ["ETHUSD_PERP"], ["aggTrade"], market="coinm")
    where = "where symbol = 'DOGEUSDT'"
    for table in ("usdm_agg_trades", "usdm_mark_prices", "usdm_liquidations", "usdm_open_interest"):
        wait_until(lambda table=table: rows(db, table, where), 40, f"DOGEUSDT rows in {table}")  # type: ignore[misc]
    wait_until(lambda: rows(db, "coinm_agg_trades", "where symbol = 'ETHUSD_PERP'"), 30, "ETHUSD_PERP trades")

    trades = export(stack, tmp_path, "DOGEUSDT", "aggTrade")
    assert tuple(trades[0]) == TABLE_COLUMNS["usdm_agg_trades"] and len(trades) > 1
    ids = [int(row[1]) for row in trades[1:]]
    assert ids == sorted(ids) and all(row[0] == "DOGEUSDT" for row in trades[1:])
    liquidations = cli(stack, "export", "DOGEUSDT", "forceOrder", "--market", "usdm", "-o", str(tmp_path / "l.csv"))
    assert liquidations.returncode == 0, liquidations.stderr
    assert "(a sample, not every liquidation: Binance streams at most one per symbol per second)" in liquidations.stdout
    for kind in ("markPrice", "openInterest"):
        table = f"usdm_{'mark_prices' if kind == 'markPrice' else 'open_interest'}"
        assert tuple(export(stack, tmp_path, "DOGEUSDT", kind)[0]) == TABLE_COLUMNS[table]

    wait_until(lambda: cli(stack, "book", "DOGEUSDT", "--market", "usdm", "--at", "-1s").returncode == 0, 30, "a book")
    books = export(stack, tmp_path, "DOGEUSDT", "book", "--start", "-20s", "--step", "200ms", "--levels", "5")
    last = books[-1]
    base = stack.env["BINANCE_USDM_REST_URL"]
    truth = requests.get(f"{base}/fake/book", params={"symbol": "DOGEUSDT", "update_id": last[1]}, timeout=5).json()
    assert [float(value) for value in last[2:12]] == [float(v) for level in truth["bids"][:5] for v in level]
    assert [float(value) for value in last[12:22]] == [float(v) for level in truth["asks"][:5] for v in level]

    for symbol, market, source in (
        ("DOGEUSDT", "usdm", "usdm_agg_trades"),
        ("ETHUSD_PERP", "coinm", "coinm_agg_trades"),
    ):
        chart = cli(stack, "chart", symbol, "--market", market, "--start", "-5m", "-o", str(tmp_path / f"{symbol}.png"))
        assert chart.returncode == 0 and f"PNG from {source} " in chart.stdout, chart.stdout + chart.stderr
        assert (tmp_path / f"{symbol}.png").read_bytes().startswith(b"\x89PNG")

    page = scrape_of(stack, db)
    assert page.value("binance_recorder_book_synced", market="usdm", symbol="DOGEUSDT") == 1
    assert (page.value("binance_recorder_books", market="usdm", state="synced") or 0) >= 1


def export(stack: LocalStack, tmp_path: Path, symbol: str, kind: str, *args: str) -> list[list[str]]:
    """`export SYMBOL KIND --market usdm` of the last ten minutes, read back."""
    path = tmp_path / f"{symbol}-{kind}.csv"
    done = cli(stack, "export", symbol, kind, "--market", "usdm", "--start", "-10m", *args, "-o", str(path))
    assert done.returncode == 0, done.stderr
    with path.open(newline="") as file:
        return list(csv.reader(file))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("export", "BTCUSDT", "markPrice"), "error: unknown table or stream kind 'markPrice' in spot: use one of"),
        (("export", "BTCUSDT", "avgPrice", "--market", "usdm"), "unknown table or stream kind 'avgPrice' in usdm"),
        (("export", "BTCUSDT", "kline_1s", "--market", "usdm"), "error: unknown kline interval '1s': use one of 1m"),
        (("chart", "BTCUSDT", "--market", "eurm"), "invalid choice: 'eurm'"),
    ],
)
def test_bad_export_or_chart_input_is_one_line_and_exit_2(
    stack: LocalStack, args: tuple[str, ...], expected: str
) -> None:
    done = cli(stack, *args)
    assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_pair_kinds_are_subscribed_by_pair_and_fill_their_tables(stack: LocalStack, db: Engine) -> None:
    # Pairs no other test here records by pair: unsubscribing a pair takes every stream named by it.
    usdm = cli(stack, "subscribe", "DOGEUSDT", "--market", "usdm", "--streams", "continuousKline_1m")
    assert usdm.returncode == 0, usdm.stderr
    assert json.loads(usdm.stdout)["streams"] == ["dogeusdt_perpetual@continuousKline_1m"]
    coinm = cli(stack, "subscribe", "ETHUSD", "--market", "coinm", "--streams", "indexPrice@1s,indexPriceKline_1m")
    assert coinm.returncode == 0, coinm.stderr
    assert json.loads(coinm.stdout)["pairs"] == ["ETHUSD"]
    wait_until(
        lambda: (
            rows(db, "usdm_continuous_klines", "where pair = 'DOGEUSDT' and contract_type = 'PERPETUAL'")
            and rows(db, "coinm_index_prices", "where pair = 'ETHUSD'")
            and rows(db, "coinm_index_price_klines", "where pair = 'ETHUSD'")
        ),
        20,
        "rows of the pair kinds",
    )
    refused = cli(stack, "subscribe", "ETHUSD_PERP", "--market", "coinm", "--streams", "indexPrice")
    assert refused.returncode == 2 and refused.stderr.startswith("error: unknown pair ETHUSD_PERP on coinm")
    # The listing check (every second here) has not taken the pair for a delisted contract.
    gone = cli(stack, "unsubscribe", "ETHUSD", "--market", "coinm")
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["stopped"] + json.loads(gone.stdout)["shrunk"], gone.stdout
