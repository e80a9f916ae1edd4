"""`subscribe --all`: the whole spot market of the fake, followed through a listing, a
halt, a resumption and a delisting made mid-run, on a real stack (Redis, workers, beat,
the fake exchange, SQLite)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from fake_binance.config import DEFAULT_SYMBOLS
from tests.conftest import fake_control, launch_stack, status_command, wait_until
from worker.exchange.listings import exchange_info_on
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.local_stack import LocalStack
from worker.settings import get_settings
from worker.store.storage import make_engine

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


@pytest.fixture(scope="module")
def db(stack: LocalStack) -> Iterator[Engine]:
    engine = make_engine(stack.env["DATABASE_URL"])
    yield engine
    engine.dispose()


def cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args], env=stack.env, capture_output=True, text=True, timeout=60
    )


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


def test_bad_input_is_one_line_and_exit_2(stack: LocalStack) -> None:
    for args, words in (
        (["--all", "BTCUSDT"], "--all subscribes every symbol"),
        (["--quote", "USDT", "BTCUSDT"], "--quote narrows --all"),
        ([], "or --all for the whole market"),
        (["--all", "--quote", "XYZ"], "unknown quote asset XYZ on spot"),
        (["--all", "--streams", "nosuchkind"], "nosuchkind"),
    ):
        result = cli(stack, "subscribe", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, (args, result.stderr)
    assert registry(stack).market_subscriptions() == {}


@pytest.mark.slow
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
    delisted = sorted(before.values(), key=lambda g: g.id)[0].symbols[0]
    halted = sorted(before.values(), key=lambda g: g.id)[-1].symbols[-1]
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
    assert unchanged, "three groups, two changes of symbols in at most two of them: one is untouched"
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
