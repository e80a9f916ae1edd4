"""The data commands as a user runs them: `binance-recorder backfill`, `export`, `chart`
against a real Redis, the fake exchange's REST API and a real SQLite file; and the
errors a user meets (unknown symbol, empty range, missing database)."""

from __future__ import annotations

import csv
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import clean_env
from worker.ops.local_stack import LocalStack
from worker.store.storage import create_schema, make_engine


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Redis and the fake exchange only: these commands need no worker."""
    stack = LocalStack(tmp_path_factory.mktemp("cli"), env=clean_env())
    stack.start_redis()
    stack.start_fake_exchange()
    yield stack
    stack.stop()


def cli(stack: LocalStack, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args],
        env=stack.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backfill_fetches_a_kline_range_with_progress_and_waits_out_a_429(exchange: LocalStack) -> None:
    requests.post(
        f"{exchange.env['BINANCE_REST_URL']}/fake/control",
        json={"action": "rest_fault", "status": 429, "count": 1, "retry_after": 1},
        timeout=5,
    )

    done = cli(exchange, "backfill", "btcusdt", "kline_1m", "--start", "-50m", "--end", "-10m")

    assert done.returncode == 0, done.stderr
    assert "rows=40" in done.stdout
    assert "BTCUSDT kline_1m: 100%" in done.stderr  # progress, as plain lines off a terminal
    again = cli(exchange, "backfill", "BTCUSDT", "kline_1m", "--start", "-50m", "--end", "-10m")
    assert again.returncode == 0 and "rows=40" in again.stdout  # the finished job is not fetched again


def test_export_writes_the_backfilled_klines_to_csv(exchange: LocalStack, tmp_path: Path) -> None:
    out = tmp_path / "klines.csv"
    done = cli(exchange, "export", "BTCUSDT", "kline_1m", "--start", "-50m", "--end", "-10m", "-o", str(out))

    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 40 and done.stdout.startswith("40 rows")
    open_times = [int(row["open_time"]) for row in rows]
    assert open_times == sorted(open_times) and open_times[1] - open_times[0] == 60_000


def test_chart_draws_a_png_of_the_requested_size(exchange: LocalStack, tmp_path: Path) -> None:
    out = tmp_path / "btc.png"
    done = cli(exchange, "chart", "BTCUSDT", "--start", "-50m", "--end", "-10m", "--size", "800x500", "-o", str(out))

    assert done.returncode == 0, done.stderr
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (800, 500)
    assert "klines 1m" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("export", "XRPUSDT", "trade"), "no trades rows for XRPUSDT"),
        (("export", "BTCUSDT", "kline_1m", "--start", "-5m", "--end", "-10m"), "before"),
        (("chart", "BTCUSDT", "--start", "2020-01-01", "--end", "2020-01-02"), "BTCUSDT"),
        (("backfill", "BTCUSDT", "depth"), "depth"),
        (("backfill", "NOTACOIN", "kline_1m", "--start", "-20m", "--end", "-10m"), "NOTACOIN"),
    ],
)
def test_bad_input_exits_2_with_a_message_that_says_what_was_wrong(
    exchange: LocalStack, args: tuple[str, ...], message: str
) -> None:
    done = cli(exchange, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr


def test_a_missing_database_is_reported_not_created(exchange: LocalStack, tmp_path: Path) -> None:
    env = {**exchange.env, "DATABASE_URL": f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"}
    for command in (["status"], ["export", "BTCUSDT", "trade"], ["chart", "BTCUSDT"]):
        done = subprocess.run(
            [sys.executable, "-m", "worker.ops.cli", *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and "no database at" in done.stderr, command
    assert not (tmp_path / "nowhere").exists()


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The command's stderr, which must be a single `error: ...` line."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DRAIN_BATCH_SIZE", "lots", "DRAIN_BATCH_SIZE='lots' is not a valid int"),
        ("DRAIN_BATCH_SIZE", "0", "DRAIN_BATCH_SIZE=0 is out of range: it must be at least 1"),
        ("DRAIN_BATCH_SIZE", "-1", "DRAIN_BATCH_SIZE=-1 is out of range"),
        ("FLUSH_INTERVAL_MS", "-5", "FLUSH_INTERVAL_MS=-5 is out of range"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL='mysql://x' is not supported"),
    ],
)
def test_a_bad_setting_is_one_line_exit_2_for_every_command_and_help_still_works(
    exchange: LocalStack, variable: str, value: str, message: str
) -> None:
    env = {**exchange.env, variable: value}
    for command in (["status"], ["export", "BTCUSDT", "trade"], ["subscribe", "BTCUSDT"]):
        done = subprocess.run(
            [sys.executable, "-m", "worker.ops.cli", *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and message in one_line_error(done), command
    helped = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", "run", "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and "--symbols" in helped.stdout and not helped.stderr


def test_a_closed_output_pipe_ends_the_command_quietly(exchange: LocalStack, tmp_path: Path) -> None:
    env = {**exchange.env, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"}
    create_schema(make_engine(env["DATABASE_URL"]))
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "worker.ops.cli", "status", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader_gone.stdout is not None
    reader_gone.stdout.close()  # as `| head` does once it has its lines

    _, stderr = reader_gone.communicate(timeout=60)
    assert (reader_gone.returncode, stderr) == (141, "")
