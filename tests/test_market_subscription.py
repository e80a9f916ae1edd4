"""`subscribe --all`: the whole spot market of the fake, followed through a listing, a
halt, a resumption and a delisting made mid-run, on a real stack (Redis, workers, beat,
the fake exchange, SQLite)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from fake_binance.config import DEFAULT_SYMBOLS
from tests.conftest import cli, fake_control, launch_stack, status_command, wait_until
from worker.exchange.listings import (
    ListingWatch,
    exchange_info_on,
    follow_market,
    keep_daily_snapshot,
    market_subscription,
    subscribe_market,
)
from worker.exchange.rest import listed
from worker.groups import Group, GroupRegistry, InvalidSubscription, is_whole_market, stream_names
from worker.keys import RedisKeys
from worker.ops.cli import main
from worker.ops.local_stack import LocalStack
from worker.ops.report import render_status
from worker.ops.status import collect_status, problems
from worker.settings import Settings, get_settings
from worker.streams import SPOT, USDM

EXTRA = 48  # SYM0001USDT...: with the 10 default symbols, 58 quoted in USDT
USDT_SYMBOLS = 10 + EXTRA
BTC_SYMBOLS = ("ETHBTC", "BNBBTC")  # listed, but not in a --quote USDT subscription
NEW = "NEWUSDT"  # in the fake's model, listed mid-run


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(
        tmp_path_factory.mktemp("market"),
        fake_args=[
            "--symbols", *DEFAULT_SYMBOLS, *BTC_SYMBOLS,
            "--extra-symbols", str(EXTRA),
            "--unlisted-symbols", NEW,
            "--trades-per-second", "2",
        ],
        # 20 symbols (40 streams) a connection: three groups of 20, 20 and 18 symbols.
        env={"LISTING_REFRESH_SECONDS": "1", "MAX_STREAMS_PER_CONNECTION": "40"},
        stream_concurrency=5,
    )  # fmt: skip
    yield stack
    stack.stop()


def registry(stack: LocalStack) -> GroupRegistry:
    return GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys(get_settings().redis_prefix))


def symbols_stored(db: Engine, table: str) -> set[str]:
    with db.connect() as conn:
        return {row[0] for row in conn.execute(text(f"select distinct symbol from {table}"))}


def changes(db: Engine) -> set[tuple[str, str | None, str]]:
    with db.connect() as conn:
        rows = conn.execute(text("select symbol, old_status, new_status from listing_changes where market = 'spot'"))
        return {(row[0], row[1], row[2]) for row in rows}


def connection(registry: GroupRegistry, group: Group) -> tuple[str, str, str]:
    """What identifies a group's connection: its task, when it connected, its reconnects."""
    record = registry.status(group.id)
    return record.get("task_id", ""), record.get("connected_since", ""), record.get("reconnects", "")


def symbols_recorded(registry: GroupRegistry) -> set[str]:
    return {symbol for group in registry.wanted().values() for symbol in group.symbols}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["subscribe", "--all", "BTCUSDT"], "--all means every symbol"),
        (["subscribe", "--quote", "USDT", "BTCUSDT"], "--quote narrows --all"),
        (["subscribe"], "or --all for the whole market"),
        (["unsubscribe"], "or --all for the whole market"),
    ],
)
def test_symbols_and_all_are_one_or_the_other(args: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and words in error, error


def test_bad_input_the_worker_finds_is_one_line_and_exit_2(stack: LocalStack) -> None:
    for args, words in (
        (["--all", "--quote", "XYZ"], "unknown quote asset XYZ on spot"),
        (["--all", "--streams", "nosuchkind"], "nosuchkind"),
    ):
        result = cli(stack, "subscribe", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, (args, result.stderr)
    assert registry(stack).market_subscriptions() == {}


def test_the_whole_market_is_recorded_and_follows_the_listing(stack: LocalStack, db: Engine) -> None:
    result = cli(stack, "subscribe", "--all", "--streams", "trade,aggTrade", "--quote", "USDT")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["symbol_count"], answer["stream_count"], len(answer["groups"])) == (58, 116, 3)
    groups = registry(stack)
    everything = {*DEFAULT_SYMBOLS, *(f"SYM{i:04d}USDT" for i in range(1, EXTRA + 1))}
    assert symbols_recorded(groups) == everything
    for table in ("trades", "agg_trades"):
        wait_until(lambda t=table: symbols_stored(db, t) >= everything, 60, f"{table} of all 58 symbols")  # type: ignore[misc]
    assert not symbols_stored(db, "trades") & set(BTC_SYMBOLS)

    today = datetime.now(tz=UTC).strftime("%Y-%m-%d")
    wait_until(lambda: exchange_info_on(db, "spot", today), 30, "the listing follower's first read of the day")
    before = groups.wanted()
    connections = {gid: connection(groups, group) for gid, group in before.items()}
    assert all(task_id for task_id, _, _ in connections.values())
    # Both from one group: whichever refresh sees which change, at most two groups change.
    delisted, halted = sorted(before.values(), key=lambda g: g.id)[0].symbols[:2]
    fake_control(stack, "set_status", symbol=NEW, status="TRADING")
    fake_control(stack, "set_status", symbol=delisted, status="DELISTED")
    fake_control(stack, "set_status", symbol=halted, status="BREAK")

    wanted = {(NEW, None, "TRADING"), (delisted, "TRADING", "DELISTED"), (halted, "TRADING", "BREAK")}
    wait_until(lambda: changes(db) >= wanted, 30, f"listing_changes rows {wanted}")
    following = everything - {delisted, halted} | {NEW}
    wait_until(lambda: symbols_recorded(groups) == following, 10, "the groups to follow the listing")
    for table in ("trades", "agg_trades"):
        wait_until(lambda t=table: NEW in symbols_stored(db, t), 30, f"{table} of the new listing {NEW}")  # type: ignore[misc]

    after = groups.wanted()
    assert set(after) == set(before), "no group was started or stopped: the changes fit the groups there were"
    unchanged = [gid for gid in before if before[gid].streams == after[gid].streams]
    assert unchanged, "three groups, changes in at most two of them: one is untouched"
    for gid in after:  # changed groups subscribe on their open connection; untouched ones see nothing
        assert connection(groups, after[gid]) == connections[gid], gid

    fake_control(stack, "set_status", symbol=halted, status="TRADING")
    wait_until(lambda: (halted, "BREAK", "TRADING") in changes(db), 30, f"{halted} trading again")
    wait_until(lambda: halted in symbols_recorded(groups), 10, f"{halted} recorded again")

    status = status_command(stack)
    lines = status.stdout.splitlines()
    assert len(lines) < 40, status.stdout
    summary = [line for line in lines if line.startswith("spot market subscription")]
    assert summary == [
        "spot market subscription (trade,aggTrade; quote USDT; status TRADING): 58 symbols, 116 streams, "
        f"3 connections: 3 recording, 0 waiting; {summary[0].split('waiting; ')[1]}"
    ], status.stdout
    assert not any(gid in status.stdout for gid in after), "no line per group"
    assert f"spot {delisted}: TRADING -> DELISTED" in status.stdout

    body = exchange_info_on(db, "spot", today)
    assert body is not None
    listed = {entry["symbol"] for entry in json.loads(body)["symbols"]}
    assert listed == everything | set(BTC_SYMBOLS), "the day's first read is kept: the listing before the changes"
    assert exchange_info_on(db, "spot", "2001-01-01") is None

    result = cli(stack, "unsubscribe", "--all")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["stopped"]) == sorted(after)
    assert groups.market_subscriptions() == {} and groups.wanted() == {}


# -- the follower's rules, on a real Redis and database, with listings given directly --------


def info(statuses: dict[str, str]) -> dict[str, object]:
    """An exchangeInfo answer listing `statuses`, each symbol quoted in its last 3-4 letters."""
    quote = lambda symbol: "USDT" if symbol.endswith("USDT") else symbol[-3:]  # noqa: E731
    return {"symbols": [{"symbol": s, "status": st, "quoteAsset": quote(s)} for s, st in statuses.items()]}


def spot_rows(engine: Engine) -> list[tuple[str, str | None, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("select symbol, old_status, new_status from listing_changes order by id"))
        return [(row[0], row[1], row[2]) for row in rows]


def test_a_refresh_records_each_change_once_and_keeps_the_untouched_groups(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    groups, watch = GroupRegistry(redis_client, keys), ListingWatch(redis_client, keys)
    subscription = market_subscription(SPOT, ["trade"], ["usdt"], ["TRADING"])
    first = {"AAAUSDT": "TRADING", "BBBUSDT": "TRADING", "CCCUSDT": "BREAK", "DDDBTC": "TRADING", "EEEUSDT": "TRADING"}
    symbols, new = subscribe_market(groups, watch, subscription, info(first), max_per_group=2)
    assert symbols == ["AAAUSDT", "BBBUSDT", "EEEUSDT"]  # not halted CCC, not BTC-quoted DDD
    assert [g.streams for g in new] == [("aaausdt@trade", "bbbusdt@trade"), ("eeeusdt@trade",)]
    assert groups.market_subscriptions() == {SPOT: subscription}

    def refresh(statuses: dict[str, str], now: int) -> list[Group]:
        report = follow_market(groups, watch, engine, SPOT, listed(info(statuses)), subscription, [], 2, now)
        return report.new_groups

    assert refresh(first, 1) == [] and spot_rows(engine) == [], "nothing changed, nothing recorded"
    # BBB delisted, CCC trades again, FFF listed (in EEE's group, which has room), DDD (BTC) ignored.
    second = {"AAAUSDT": "TRADING", "CCCUSDT": "TRADING", "DDDBTC": "BREAK", "EEEUSDT": "TRADING", "FFFUSDT": "TRADING"}
    made = refresh(second, 2)
    assert spot_rows(engine) == [
        ("CCCUSDT", "BREAK", "TRADING"),
        ("FFFUSDT", None, "TRADING"),
        ("BBBUSDT", "TRADING", "DELISTED"),
    ]
    assert sorted(g.streams for g in groups.wanted().values()) == [
        ("aaausdt@trade", "cccusdt@trade"),
        ("eeeusdt@trade", "fffusdt@trade"),
    ]
    assert made == [], "the changes fit the groups there were"
    assert refresh(second, 3) == [] and len(spot_rows(engine)) == 3, "a second look at the same listing changes nothing"
    # AAA halts: it leaves its group but stays followed, so it comes back without a second row of its past.
    refresh({**second, "AAAUSDT": "HALT"}, 4)
    refresh(second, 5)
    assert spot_rows(engine)[3:] == [("AAAUSDT", "TRADING", "HALT"), ("AAAUSDT", "HALT", "TRADING")]
    assert "AAAUSDT" in symbols_recorded(groups)


def test_the_days_first_exchange_info_is_kept(engine: Engine) -> None:
    day_ms = 1_796_601_600_000  # 2026-12-07T00:00Z
    assert keep_daily_snapshot(engine, SPOT, info({"AAAUSDT": "TRADING"}), day_ms + 5)
    assert not keep_daily_snapshot(engine, SPOT, info({"BBBUSDT": "TRADING"}), day_ms + 9)
    assert keep_daily_snapshot(engine, USDM, info({"BBBUSDT": "TRADING"}), day_ms + 9)
    assert json.loads(exchange_info_on(engine, SPOT, "2026-12-07") or "")["symbols"][0]["symbol"] == "AAAUSDT"
    assert exchange_info_on(engine, SPOT, "2026-12-06") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: is_whole_market(["*", "BTCUSDT"], None, None), "pass \\['\\*'\\] alone"),
        (lambda: is_whole_market(["BTCUSDT"], ["USDT"], None), "narrow a market subscription"),
        (lambda: market_subscription(SPOT, ["trade"], "USDT", ["TRADING"]), "quote_assets must be a list"),
        (lambda: market_subscription(SPOT, ["trade"], [], ["TRADNG"]), "unknown status TRADNG"),
    ],
)
def test_bad_market_subscriptions_say_what_is_wrong(call: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidSubscription, match=message):
        call()


def test_status_of_1500_symbols_is_one_screen(redis_client: redis.Redis, keys: RedisKeys, engine: Engine) -> None:
    """Three groups of 512, 512 and 476 symbols, none running: one summary line, and
    problems that name a few symbols of each group, not all of them. One screen: fewer
    than 40 lines on a terminal 120 columns wide."""
    groups = GroupRegistry(redis_client, keys)
    symbols = [f"S{i:04d}USDT" for i in range(1500)]
    groups.subscribe_market(market_subscription(SPOT, ["trade", "aggTrade"], ["USDT"], ["TRADING"]))
    groups.place(stream_names(symbols, ["trade", "aggTrade"]), 1024, SPOT)
    settings = Settings.from_env({"REDIS_PREFIX": keys.prefix})
    snapshot = collect_status(settings, redis_client, engine)
    found = problems(snapshot, settings)
    lines = render_status(snapshot, found).splitlines()
    assert sum(1 + len(line) // 120 for line in lines) < 40, "\n".join(lines)
    assert lines[0] == (
        "spot market subscription (trade,aggTrade; quote USDT; status TRADING): 1500 symbols, 3000 streams, "
        "3 connections: 0 recording, 3 waiting; 0.0 msg/s, backlog 0"
    )
    assert len(found) == 3 and all("and 507 more" in problem or "and 471 more" in problem for problem in found), found
