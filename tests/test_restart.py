"""`binance-recorder run` (what `scripts/run` execs) as a user runs it: run, stop with
Ctrl-C, run again at once in the same directory; meanwhile a second shell's commands
find the running stack (its fake exchange, its Redis port) with no settings at all."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import requests
from sqlalchemy import create_engine, text

from tests.conftest import clean_env, wait_until
from worker.ops.local_stack import free_port

SYMBOLS = "BTCUSDT,ETHUSDT"


BINANCE_RECORDER = str(Path(sys.executable).with_name("binance-recorder"))  # what scripts/run execs


class Run:
    """One `binance-recorder run` in `directory`, its output collected line by line.

    After `close_output()` the reader closes the output at the next line, as `| head`
    does once it has its lines. `nohup` starts it with SIGHUP ignored.
    """

    def __init__(
        self,
        directory: Path,
        redis_port: int,
        flower_port: int = 0,
        metrics_port: int = 0,
        env: dict[str, str] | None = None,
        nohup: bool = False,
    ) -> None:
        self.lines: list[str] = []
        self._close = threading.Event()
        self.popen = subprocess.Popen(
            [*(["nohup"] if nohup else []), BINANCE_RECORDER, "run", "--exchange", "fake", "--symbols", SYMBOLS,
             "--redis-port", str(redis_port), "--flower-port", str(flower_port), "--metrics-port", str(metrics_port),
             "--report-every", "1"],
            cwd=directory,
            env=clean_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._close.is_set():
                self.popen.stdout.close()
                return

    def close_output(self) -> None:
        self._close.set()

    def line(self, pattern: str) -> re.Match[str] | None:
        return next((m for m in map(re.compile(pattern).search, self.lines) if m), None)

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.popen.send_signal(sig)
        return self.popen.wait(60)

    def output(self) -> str:
        return "\n".join(self.lines)


def trades(directory: Path) -> int:
    engine = create_engine(f"sqlite:///{directory / 'data' / 'binance.db'}")
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("select count(*) from trades")).scalar_one())
    except Exception:  # not created yet
        return 0
    finally:
        engine.dispose()


def second_shell(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command in another shell in the same directory, with no service variables set."""
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args],
        cwd=directory,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def wait_recording(run: Run) -> str:
    """The exchange URL the run printed, once it records and the URL answers."""
    wait_until(lambda: run.line(r"^recording ") or run.popen.poll() is not None, 90, "the run to start recording")
    assert run.popen.poll() is None, run.output()
    match = run.line(r"^exchange: bundled fake exchange at (\S+)")
    assert match, run.output()
    assert requests.get(f"{match.group(1)}/api/v3/ping", timeout=5).ok  # this run's exchange, not the last one's
    return match.group(1)


def test_a_second_shell_finds_the_running_stack_and_the_readme_commands_work(tmp_path: Path) -> None:
    run = Run(tmp_path, free_port())
    try:
        wait_recording(run)
        wait_until(lambda: trades(tmp_path) > 0, 60, "the first trades")

        backfill = second_shell(tmp_path, "backfill", "BTCUSDT", "kline_1m", "--start", "-10m", "--end", "now")
        status = second_shell(tmp_path, "status")
        chart = second_shell(tmp_path, "chart", "BTCUSDT", "--start", "-5m", "-o", "btc.png")
        # The fake's futures URLs come from stack.json too (Binance's own are unreachable here).
        futures = second_shell(tmp_path, "subscribe", "BTCUSD_PERP", "--market", "coinm", "--streams", "aggTrade")
    finally:
        assert run.stop() == 0, run.output()

    assert backfill.returncode == 0 and "rows=10" in backfill.stdout, backfill.stderr
    assert status.returncode == 0 and "status: healthy" in status.stdout, status.stdout + status.stderr
    listed = {line.split()[0] for line in status.stdout.splitlines() if line.strip()}
    assert {"trades", "depth_updates"} <= listed  # spot's tables, rows or not
    assert not {name for name in listed if name.startswith(("usdm_", "coinm_"))}  # empty futures tables are not
    assert chart.returncode == 0 and (tmp_path / "btc.png").exists(), chart.stderr
    assert futures.returncode == 0 and '"BTCUSD_PERP": "TRADING"' in futures.stdout, futures.stderr
    assert not (tmp_path / "data" / "stack.json").exists()  # gone with the stack


def test_run_stop_and_run_again_at_once_keeps_recording(tmp_path: Path) -> None:
    port = free_port()
    first = Run(tmp_path, port)
    try:
        wait_recording(first)
        wait_until(lambda: trades(tmp_path) > 0, 60, "the first run's trades")
    finally:
        assert first.stop() == 0, first.output()
    stored = trades(tmp_path)

    again = Run(tmp_path, port)  # at once: the Redis port's sockets are in TIME_WAIT
    try:
        wait_recording(again)
        assert again.line(r"^recording BTCUSDT, ETHUSDT in 1 group"), again.output()  # the same group
        wait_until(lambda: trades(tmp_path) > stored + 40, 30, f"new trades after the restart (had {stored})")
    finally:
        assert again.stop() == 0, again.output()
    logs = (tmp_path / "data" / "logs" / "fake-exchange.log").read_text()
    assert logs.count("listening on") == 2  # each run's log lines are kept, and each run read its own
