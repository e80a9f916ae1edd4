"""Groups are living sets: subscribing joins a running group with room through a live
SUBSCRIBE, unsubscribing leaves it with UNSUBSCRIBE, with no reconnect and no gap for
the other symbols; only a full group starts a new one, and when no streams process is
free `subscribe` and `status` say so, with the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import call, fake_stats, launch_stack, status_command, wait_until
from worker.ops.local_stack import LocalStack


def rows(stack: LocalStack, symbol: str) -> int:
    engine = create_engine(stack.env["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("select count(*) from trades where symbol = :s"), {"s": symbol}).scalar_one())
    except Exception:  # the drain has not created the schema yet
        return 0
    finally:
        engine.dispose()


def trade_ids(stack: LocalStack, symbol: str) -> tuple[int, int, int]:
    engine = create_engine(stack.env["DATABASE_URL"])
    with engine.connect() as conn:
        row = conn.execute(
            text("select count(distinct trade_id), min(trade_id), max(trade_id) from trades where symbol = :s"),
            {"s": symbol},
        ).one()
    engine.dispose()
    return row[0], row[1], row[2]


def cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args], env=stack.env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("roomy"), env={"MAX_STREAMS_PER_CONNECTION": "4"})
    yield stack
    stack.stop()


@pytest.fixture
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("one"), env={"MAX_STREAMS_PER_CONNECTION": "2"}, stream_concurrency=1)
    yield stack
    stack.stop()


def test_symbols_join_and_leave_a_running_group_on_its_open_connection(roomy: LocalStack) -> None:
    first = call(roomy, "tasks.subscribe", ["BTCUSDT"], ["trade"])
    wait_until(lambda: rows(roomy, "BTCUSDT"), 30, "BTCUSDT trades")

    joined = call(roomy, "tasks.subscribe", ["ETHUSDT"], ["trade"])
    assert joined["new_groups"] == [] and joined["groups"] == first["groups"]
    wait_until(lambda: rows(roomy, "ETHUSDT"), 30, "ETHUSDT trades, subscribed live")
    assert call(roomy, "tasks.subscribe", ["BNBUSDT"], ["trade"])["groups"] == first["groups"]
    left = call(roomy, "tasks.unsubscribe", ["ETHUSDT"])
    assert left == {"market": "spot", "stopped": [], "shrunk": first["groups"]}
    wait_until(lambda: rows(roomy, "BNBUSDT"), 30, "BNBUSDT trades, subscribed live")
    wait_until(
        lambda: [c["streams"] for c in fake_stats(roomy)["open_connections"]] == [["btcusdt@trade", "bnbusdt@trade"]],
        15,
        "the connection to carry BTCUSDT and BNBUSDT only",
    )

    connections = fake_stats(roomy)["connections"]
    assert connections["opened_total"] == 1 and connections["closed_for_rate_limit"] == 0
    assert call(roomy, "tasks.unsubscribe", ["BTCUSDT", "BNBUSDT"]) == {
        "market": "spot",
        "stopped": first["groups"],
        "shrunk": [],
    }
    wait_until(lambda: fake_stats(roomy)["connections"]["open"] == 0, 15, "the connection to close")
    sent = fake_stats(roomy)["sent"]["BTCUSDT"]["trade"]
    wait_until(
        lambda: trade_ids(roomy, "BTCUSDT") == (sent["count"], sent["first"], sent["last"]),
        20,
        f"every BTCUSDT trade sent ({sent}) stored, although the group changed twice",
    )


def test_past_the_process_count_subscribe_and_status_say_so_and_name_the_fix(one_process: LocalStack) -> None:
    call(one_process, "tasks.subscribe", ["BTCUSDT"], ["trade", "ticker"])  # fills the one group and process

    waiting = cli(one_process, "subscribe", "ETHUSDT", "--streams", "trade")

    assert waiting.returncode == 1, waiting.stderr
    assert "no free streams process" in waiting.stderr and "STREAM_WORKER_CONCURRENCY" in waiting.stderr
    (waiting_group,) = json.loads(waiting.stdout)["waiting"]
    status = status_command(one_process)
    assert status.returncode == 1
    assert "is waiting: no free streams process" in status.stdout and "--scale worker-streams=2" in status.stdout
    row = next(line.split() for line in status.stdout.splitlines() if line.startswith(waiting_group))
    assert row[4] == "waiting" and "NOT RUNNING" not in status.stdout  # its STATE column
    as_json = json.loads(status_command(one_process, "--json").stdout)
    (shown,) = [group for group in as_json["groups"] if group["id"] == waiting_group]
    assert shown["state"] == "waiting" and not shown["live"]
    call(one_process, "tasks.unsubscribe", ["BTCUSDT"])
    wait_until(lambda: rows(one_process, "ETHUSDT"), 60, "ETHUSDT to be recorded once the process is free")


@pytest.mark.parametrize(
    ("symbols", "message"),
    [
        (["NOTACOIN"], "unknown symbol NOTACOIN: Binance says 'Invalid symbol.'"),
        (["btc-usdt"], "unknown symbol BTC-USDT"),
        ([""], "'' is not a Binance symbol"),
        (["NOTACOIN", "BTCUSDT", "NOTEITHER"], "2 unknown symbols: NOTACOIN, NOTEITHER"),
    ],
)
def test_a_task_refusing_bad_symbols_is_one_line_on_the_cli_exit_2(
    roomy: LocalStack, symbols: list[str], message: str
) -> None:
    done = cli(roomy, "subscribe", *symbols)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr
