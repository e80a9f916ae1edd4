"""`status` names a subscribed trade or book stream that stores nothing while its
connection is up and the group's other streams flow (real stack: Redis, the fake
exchange muting one stream, workers, beat, and the `status` command as run by hand)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import call, fake_control, launch_stack, status_command, wait_until
from worker.ops.local_stack import LocalStack
from worker.ops.status import silent_streams

STALE_SECONDS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("stale"), env={"STALE_STREAM_SECONDS": str(STALE_SECONDS)})
    yield stack
    stack.stop()


def _healthy(stack: LocalStack) -> subprocess.CompletedProcess[str] | None:
    done = status_command(stack)
    return done if done.returncode == 0 else None


def _warning_about(stack: LocalStack, stream: str) -> subprocess.CompletedProcess[str] | None:
    done = status_command(stack)
    return done if done.returncode == 1 and f"stream {stream} " in done.stdout else None


def _problems(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[4:] for line in done.stdout.splitlines() if line.startswith("  - ")]


@pytest.mark.parametrize("stream", ["ethusdt@trade", "btcusdt@depth@100ms"])
def test_one_silent_stream_among_flowing_ones_is_a_one_line_warning_until_it_flows_again(
    stack: LocalStack, stream: str
) -> None:
    subscribed = call(stack, "tasks.subscribe", ["BTCUSDT", "ETHUSDT"], ["trade"])
    call(stack, "tasks.subscribe", ["BTCUSDT"], ["depth@100ms"])  # joins the same group, live
    group = subscribed["groups"][0]
    # Healthy once every stream stores, for longer than STALE_STREAM_SECONDS.
    wait_until(lambda: _healthy(stack), 60, "status to exit 0 with every stream storing")

    fake_control(stack, "mute_stream", stream=stream, seconds=120)  # the connection stays up
    try:
        done = wait_until(lambda: _warning_about(stack, stream), 30, f"status to warn about {stream}")
        problems = _problems(done)
        assert len(problems) == 1, done.stdout  # the group's other streams flow: no word of them
        assert problems[0].startswith(f"stream {stream} of group {group} (BTCUSDT, ETHUSDT) stored nothing for ")
        assert "while its connection is up (STALE_STREAM_SECONDS=3)" in problems[0]
        as_json = json.loads(status_command(stack, "--json").stdout)
        assert not as_json["healthy"] and any(stream in p for p in as_json["problems"])
        (group_json,) = as_json["groups"]
        assert group_json["state"] == "connected" and set(group_json["stored_at"]) == {
            "btcusdt@trade",
            "ethusdt@trade",
            "btcusdt@depth@100ms",
        }
    finally:
        fake_control(stack, "mute_stream", stream=stream, seconds=0)

    wait_until(lambda: _healthy(stack), 30, f"status to exit 0 once {stream} stores again")


def _group(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "live": True,
        "state": "connected",
        "connected_since": 1_000,
        "streams_changed_at": None,
        "stored_at": {"btcusdt@trade": 9_000, "ethusdt@trade": None},
    }
    return {**base, **fields}


def test_silence_counts_from_the_last_stored_row_the_connection_or_the_last_change_of_streams() -> None:
    assert silent_streams(_group(), now=10_000, stale_seconds=5) == {"ethusdt@trade": 9.0}  # never stored
    assert silent_streams(_group(), now=15_000, stale_seconds=5) == {"ethusdt@trade": 14.0, "btcusdt@trade": 6.0}
    # A stream subscribed live at 8 s had no chance to store before.
    assert silent_streams(_group(streams_changed_at=8_000), now=10_000, stale_seconds=5) == {}
    # Reconnecting, stopped, or the check off: no word of streams (other problems speak).
    assert silent_streams(_group(state="reconnecting"), now=15_000, stale_seconds=5) == {}
    assert silent_streams(_group(live=False), now=15_000, stale_seconds=5) == {}
    assert silent_streams(_group(), now=15_000, stale_seconds=0) == {}
