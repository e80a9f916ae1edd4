"""`data/stack.json`: what a local stack started, kept while it runs.

Two readers need it. The CLI in other shells takes the stack's URLs from it (the fake
exchange's port changes with every run). And when `binance-recorder run` was killed
outright (SIGKILL, no chance to clean up), the next `run` or `binance-recorder stop`
finds the processes it left from it. A pid alone could by then name an unrelated
process, so every pid is stored with the process's start time and acted on only while
both still match.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STACK_RECORD = "stack.json"
RECORDED_VARIABLES = (
    "REDIS_URL",
    "DATABASE_URL",
    "BINANCE_REST_URL",
    "BINANCE_WS_URL",
    "BINANCE_USDM_REST_URL",
    "BINANCE_USDM_WS_URL",
    "BINANCE_COINM_REST_URL",
    "BINANCE_COINM_WS_URL",
)
STOP_TIMEOUT_SECONDS = 15.0
# How long a live run gets to stop its stack in order before the rest is stopped for it.
OWNER_STOP_TIMEOUT_SECONDS = 60.0


def process_start(pid: int) -> str | None:
    """When the process started, as a string that differs for a later process with the pid.

    On Linux the start tick from /proc with the boot's id (ticks restart at boot);
    elsewhere `ps`'s start time. None when no such process runs (a zombie counts as
    gone: it only waits for its parent to read its exit code).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        return _ps_start(pid)
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot}:{fields[19]}"


def _ps_start(pid: int) -> str | None:
    done = subprocess.run(["ps", "-o", "stat=,lstart=", "-p", str(pid)], capture_output=True, text=True)
    state, _, started = done.stdout.strip().partition(" ")
    return started.strip() if done.returncode == 0 and not state.startswith("Z") else None


@dataclass(frozen=True)
class RecordedProcess:
    """A process of the stack (or the `run` that owns it), told apart from a later one with its pid."""

    name: str
    pid: int
    started: str | None

    @classmethod
    def of(cls, name: str, pid: int) -> RecordedProcess:
        return cls(name, pid, process_start(pid))

    def running(self) -> bool:
        return self.started is not None and process_start(self.pid) == self.started


@dataclass
class StackRecord:
    """The owner (the process that started the stack), the stack's URLs and its processes."""

    owner: RecordedProcess
    env: dict[str, str]
    processes: list[RecordedProcess]

    @classmethod
    def load(cls, data_dir: Path) -> StackRecord | None:
        """The record under data_dir; None when there is none, or one unreadable or of an older layout."""
        try:
            raw: Any = json.loads((data_dir / STACK_RECORD).read_text())
            return cls(
                RecordedProcess(**raw["owner"]),
                {name: str(value) for name, value in raw["env"].items() if name in RECORDED_VARIABLES},
                [RecordedProcess(**process) for process in raw["processes"]],
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self, data_dir: Path) -> Path:
        """Write the record whole (a reader never sees half of it)."""
        path = data_dir / STACK_RECORD
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(asdict(self), indent=2))
        partial.replace(path)
        return path

    def forget(self, data_dir: Path) -> None:
        """Remove the record if it is still this owner's (a later run may have replaced it)."""
        current = StackRecord.load(data_dir)
        if current is not None and current.owner == self.owner:
            with contextlib.suppress(OSError):
                (data_dir / STACK_RECORD).unlink()

    def running(self) -> list[RecordedProcess]:
        """The recorded processes that still run, newest first (the order to stop them in)."""
        return [process for process in reversed(self.processes) if process.running()]


def recorded_stack_env(data_dir: Path) -> dict[str, str]:
    """The URLs of the stack a live `binance-recorder run` started in data_dir, if any.

    A record left by a run that died is ignored: its URLs point at nothing, or at
    processes that are about to be stopped.
    """
    record = StackRecord.load(data_dir)
    return record.env if record is not None and record.owner.running() else {}


def wait_until_gone(processes: Sequence[RecordedProcess], timeout: float) -> list[RecordedProcess]:
    """Poll until none of the processes runs or the timeout passes; returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [process for process in processes if process.running()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def stop_processes(
    processes: Sequence[RecordedProcess], timeout: float = STOP_TIMEOUT_SECONDS, group: bool = True
) -> list[str]:
    """Stop processes this process did not start, in order; returns the names of those that would not die.

    All get SIGCONT first: a stopped process (`kill -STOP`, a debugger) cannot act on
    SIGTERM, and one that holds a pending SIGTERM starts shutting down now. Then each
    gets SIGTERM and time to shut down in order, as `LocalStack.stop_process` gives its
    own children, and is killed, with its process group (a worker's pool) when `group`.
    Every signal goes out only after checking that the pid still belongs to the
    recorded process.
    """
    for process in processes:
        _signal_if_running(process, signal.SIGCONT)
    for process in processes:
        _signal_if_running(process, signal.SIGTERM)
        wait_until_gone([process], timeout)
        _signal_if_running(process, signal.SIGKILL, group=group)
    return [process.name for process in wait_until_gone(processes, timeout=5)]


def stop_stack(record: StackRecord, data_dir: Path) -> tuple[str, list[str]]:
    """Stop a recorded stack: its owner if it still runs, then whatever is left of the stack.

    A live owner (a `binance-recorder run`) gets SIGTERM and stops its stack itself,
    in order, as on Ctrl-C; what a killed one left is stopped here. Returns a line
    saying what was stopped (empty when nothing ran) and the names of the processes
    that would not die. The record goes once nothing of it runs.
    """
    owner_ran = record.owner.running()
    left = record.running()
    stuck = stop_processes([record.owner], OWNER_STOP_TIMEOUT_SECONDS, group=False) if owner_ran else []
    stuck += stop_processes(record.running())
    if not stuck:
        record.forget(data_dir)
    if not (owner_ran or left):
        return "", stuck
    whose = f"of run {record.owner.pid}" if owner_ran else f"that run {record.owner.pid} left when it was killed"
    names = [process.name for process in (record.processes if owner_ran else reversed(left))]
    return f"stopped the stack {whose} in {data_dir}: {', '.join(names)}", stuck


def _signal_if_running(process: RecordedProcess, sig: int, group: bool = False) -> None:
    if process.running():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            (os.killpg if group else os.kill)(process.pid, sig)
