"""Reliability with real processes: rotation without a gap, serverShutdown, the silence
watchdog, SIGTERM and SIGKILL of the streams worker, unsubscribe vs the supervisor."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.conftest import call, fake_control, fake_stats, launch_stack, status_command, wait_until
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_stack import LocalStack
from worker.store.storage import make_engine


def group_status(stack: LocalStack, gid: str) -> dict[str, str]:
    return GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys("recorder")).status(gid)


def trade_summary(db: Engine, symbol: str) -> tuple[int, int, int, int]:
    with db.connect() as conn:
        return tuple(
            conn.execute(
                text(
                    "select count(*), count(distinct trade_id), min(trade_id), max(trade_id)"
                    " from trades where symbol = :s"
                ),
                {"s": symbol},
            ).one()
        )  # type: ignore[return-value]


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The fake closes connections after 6 s ("24 h"); we rotate at 3 s; silence is 2 s."""
    stack = launch_stack(
        tmp_path_factory.mktemp("rotation"),
        fake_args=["--trades-per-second", "20", "--max-connection-seconds", "6"],
        env={"CONNECTION_MAX_AGE_SECONDS": "3", "SILENCE_TIMEOUT_SECONDS": "2"},
    )
    yield stack
    stack.stop()


def test_rotation_and_server_shutdown_leave_no_gap(rotating: LocalStack) -> None:
    stack = rotating
    db = make_engine(stack.env["DATABASE_URL"])
    gid = call(stack, "tasks.subscribe", ["BTCUSDT"], streams=["trade"])["groups"][0]
    wait_until(lambda: group_status(stack, gid).get("state") == "connected", 20, "the group to connect")
    time.sleep(7)  # two planned rotations
    fake_control(stack, "server_shutdown", grace_seconds=1)
    time.sleep(3)
    call(stack, "tasks.unsubscribe", ["BTCUSDT"])
    wait_until(lambda: fake_stats(stack)["connections"]["open"] == 0, 15, "the connections to close")

    stats = fake_stats(stack)
    sent = stats["sent"]["BTCUSDT"]["trade"]
    expected_ids = sent["last"] - sent["first"] + 1
    wait_until(
        lambda: trade_summary(db, "BTCUSDT") == (expected_ids, expected_ids, sent["first"], sent["last"]),
        20,
        f"trades {sent['first']}..{sent['last']} stored exactly once",
    )
    assert sent["count"] > expected_ids  # the overlaps really happened, and were deduplicated
    assert stats["connections"]["opened_total"] >= 4
    assert max(stats["connections"]["max_open_per_streamset"].values()) == 2  # only while rotating
    assert int(group_status(stack, gid)["rotations"]) >= 3


def test_a_silent_connection_is_replaced_although_pings_flow(rotating: LocalStack) -> None:
    stack = rotating
    gid = call(stack, "tasks.subscribe", ["ETHUSDT"], streams=["trade"])["groups"][0]
    wait_until(lambda: group_status(stack, gid).get("state") == "connected", 20, "the group to connect")
    opened = fake_stats(stack)["connections"]["opened_total"]
    fake_control(stack, "pause_data", seconds=2.5)  # shorter than the 6 s lifetime and 3 s rotation
    wait_until(lambda: "no data" in _log(stack, "worker-streams"), 10, "the watchdog to rotate")
    assert fake_stats(stack)["connections"]["opened_total"] > opened
    call(stack, "tasks.unsubscribe", ["ETHUSDT"])


def _log(stack: LocalStack, name: str) -> str:
    return stack.process(name).log_text()


@pytest.fixture(scope="module")
def killable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("kill"), fake_args=["--trades-per-second", "20"])
    yield stack
    stack.stop()


def open_connections(stack: LocalStack) -> int:
    return int(fake_stats(stack)["connections"]["open"])


def test_sigterm_stops_the_streams_worker_promptly_and_the_group_moves_to_the_next(killable: LocalStack) -> None:
    stack = killable
    gid = call(stack, "tasks.subscribe", ["SOLUSDT"], streams=["trade"])["groups"][0]
    wait_until(lambda: open_connections(stack) == 1, 20, "the connection")

    started = time.monotonic()
    code = stack.stop_process(stack.process("worker-streams"), signal.SIGTERM)
    took = time.monotonic() - started

    assert took < 10, f"the streams worker took {took:.1f}s to exit"
    assert code == 0
    assert "'ended': 'worker shutting down'" in _log(stack, "worker-streams")
    assert group_status(stack, gid)["state"] == "stopped"
    assert open_connections(stack) == 0
    stack.start_stream_worker(2, name="worker-streams-2")
    wait_until(lambda: open_connections(stack) == 1, 30, "the group to come back on the new worker")
    wait_until(lambda: group_status(stack, gid).get("state") == "connected", 10, "the group to report connected")


def test_sigkill_of_the_streams_worker_heals_through_lease_expiry_and_the_supervisor(killable: LocalStack) -> None:
    stack = killable
    wait_until(lambda: open_connections(stack) == 1, 30, "the group from the previous test")
    stack.stop_process(stack.process("worker-streams-2"), signal.SIGKILL)
    wait_until(lambda: open_connections(stack) == 0, 10, "the killed worker's connection to drop")
    shown = wait_until(lambda: (r := status_command(stack)).returncode == 1 and r, 15, "status to see the dead group")
    assert "status: UNHEALTHY" in shown.stdout and "has no running task" in shown.stdout

    stack.start_stream_worker(2, name="worker-streams-3")
    wait_until(lambda: open_connections(stack) == 1, 45, "the supervisor to restart the group")
    assert max(fake_stats(stack)["connections"]["max_open_per_streamset"].values()) == 1


def test_unsubscribed_groups_stay_stopped_whatever_the_supervisor_does(killable: LocalStack) -> None:
    stack = killable
    again = call(stack, "tasks.subscribe", ["SOLUSDT"], streams=["trade"])
    assert again["new_groups"] == []  # already recorded: no second connection
    call(stack, "tasks.unsubscribe", ["SOLUSDT"])
    wait_until(lambda: open_connections(stack) == 0, 15, "the connection to close")

    assert call(stack, "tasks.supervise") == {"restarted": []}
    time.sleep(3)
    assert open_connections(stack) == 0


def test_concurrent_subscribes_of_the_same_symbols_plan_one_group(killable: LocalStack) -> None:
    stack = killable
    app = client_app(stack.env["REDIS_URL"])
    pending = [app.send_task("tasks.subscribe", args=[["XRPUSDT", "ADAUSDT"]]) for _ in range(6)]
    results = [result.get(timeout=60) for result in pending]

    assert len({tuple(r["groups"]) for r in results}) == 1
    assert sum(1 for r in results if r["new_groups"]) == 1
    wait_until(lambda: open_connections(stack) == 1, 20, "the one connection")
    time.sleep(2)
    assert open_connections(stack) == 1
    call(stack, "tasks.unsubscribe", ["XRPUSDT", "ADAUSDT"])
