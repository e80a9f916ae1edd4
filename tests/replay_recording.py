"""A recording of the fake exchange made by a real stack, and `binance-recorder replay`
processes serving it: shared by the replay server's tests and the real clients' tests
(tests/conftest.py makes the `recording` and `replay_of` fixtures of them).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text
from sqlalchemy.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
SYMBOL = "BTCUSDT"
CLEAN_SECONDS = 6
"""Seconds of depth recorded before the lost stretch: the window of the client tests."""


@dataclass(frozen=True)
class Recording:
    env: dict[str, str]
    engine: Engine
    start: int  # a second after the first diff on the first snapshot
    end: int  # just after a diff that nothing else was received with, before the gap
    gap_begins: int | None  # the receive time of the last diff before the lost stretch (None: no gap recorded)
    after_gap: int | None  # a second of diffs after the book is known again, chosen as `end` is


def rows(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def depth_span(engine: Engine) -> int:
    """Milliseconds of diffs received since the first snapshot."""
    found = rows(
        engine,
        "select max(u.received_at) - min(s.received_at) from depth_updates u, depth_snapshots s "
        "where u.symbol = :s and s.symbol = :s",
        s=SYMBOL,
    )
    return found[0][0] or 0


def quiet_end(engine: Engine, after: int) -> int:
    """A window end just after a diff received at or after `after` such that the next
    diff's event time is later: the diffs received before it are then exactly those
    with event times up to it, the rows `book --at` applies."""
    diffs = rows(
        engine,
        "select received_at, event_time from depth_updates where symbol = :s and received_at >= :a "
        "order by final_update_id",
        s=SYMBOL,
        a=after,
    )
    for (received, _), (_, next_event_time) in zip(diffs, diffs[1:], strict=False):
        if next_event_time > received + 1:
            return received + 1
    raise AssertionError("no quiet point among the recorded diffs")


class Replay:
    """A `binance-recorder replay` process and its two base URLs."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.ops.cli", "replay", "--port", "0", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        assert first.startswith("replay: ws"), first + self.process.stderr.read()  # type: ignore[union-attr]
        self.ws, _, self.http = first.split()[1:4]

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(f"{self.http}{path}", params=params, timeout=10)

    def stop(self) -> str:
        """Ctrl-C, as a user stops it: the rest of its output."""
        self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=20)
        assert self.process.returncode == 0, err
        return out


def window_rows(recording: Recording, table: str, key: str, end: int | None = None) -> list[int]:
    return [
        row[0]
        for row in rows(
            recording.engine,
            f"select {key} from {table} where symbol = :s and received_at >= :a and received_at < :b order by {key}",
            s=SYMBOL,
            a=recording.start,
            b=end or recording.end,
        )
    ]


def run_client_script(
    name: str, replay: Replay, timeout: float = 60, env: dict[str, str] | None = None
) -> tuple[list[int], dict[str, Any]]:
    """Run examples/<name> on a replay: the trade ids it printed and its final book line."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), replay.http, replay.ws, SYMBOL],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return [int(line.split()[1]) for line in lines if line.startswith("trade ")], json.loads(lines[-1])


def rebuilt_top(recording: Recording, at: int) -> tuple[list[Any], list[Any]]:
    """The ten best levels a side of `binance-recorder book SYMBOL --at`, as [price, qty] pairs."""
    rebuilt = run_cli(recording.env, "book", SYMBOL, "--at", str(at), "--levels", "10", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    expected = json.loads(rebuilt.stdout)
    return expected["bids"], expected["asks"]
