"""Processes: starting the benchmark's helpers, and reading /proc about the service's.

Linux only, like the service's deployment: resident size comes from
/proc/<pid>/status, a worker's pool children from /proc/<pid>/task/<pid>/children,
and which child does what from the sockets and files it holds open.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from worker.ops.local_stack import LocalStack, ManagedProcess
from worker.settings import documented_settings

START_TIMEOUT_SECONDS = 60.0
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def service_env(**settings: object) -> dict[str, str]:
    """This process's environment without any of the service's settings, plus
    `settings` (Settings field names, e.g. drain_interval_seconds=1.0): the service
    under test runs with its defaults, whatever the shell that started the benchmark
    has set, except where the benchmark says otherwise."""
    own = {name for name, _, _ in documented_settings()}
    env = {k: v for k, v in os.environ.items() if k not in own}
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return env


def module_command(module: str, *args: object) -> list[str]:
    """`python -m module args...` with this interpreter (the project's venv)."""
    return [sys.executable, "-m", module, *(str(arg) for arg in args)]


def run_json(command: Sequence[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a helper that prints one JSON line; raise with its stderr if it fails."""
    done = subprocess.run(list(command), env=env, capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}")
    return orjson.loads(done.stdout.splitlines()[-1])


def spawn_and_wait(stack: LocalStack, name: str, command: Sequence[str], ready: str) -> re.Match[str]:
    """Start a helper through the stack (so `stack.stop()` ends it) and wait for the
    line matching `ready` in its log."""
    process = stack.spawn(name, command)
    return wait_for_log(process, re.compile(ready))


def wait_for_log(process: ManagedProcess, pattern: re.Pattern[str]) -> re.Match[str]:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.alive():
        match = pattern.search(process.log_text())
        if match:
            return match
        time.sleep(0.05)
    raise RuntimeError(f"{process.name} did not start; its log says:\n{process.log_tail()}")


def rss_kb(pid: int) -> int | None:
    """Resident set size (VmRSS) in KiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time the processes have used so far (gone ones count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / ticks


def children(pid: int) -> list[int]:
    """The direct children of a process (a Celery worker's pool processes)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def holds_connection_to(pid: int, port: int) -> bool:
    """Whether the process has a TCP connection to 127.0.0.1:`port` (its websocket)."""
    inodes = _socket_inodes(pid)
    return any(inode in inodes for inode in _inodes_connected_to(port))


def holds_file_open(pid: int, path: Path) -> bool:
    """Whether the process has `path` open (the drain keeps its SQLite file open)."""
    return str(path.resolve()) in _fd_links(pid)


def _fd_links(pid: int) -> list[str]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed in between
    return links


def _socket_inodes(pid: int) -> set[str]:
    return {link[8:-1] for link in _fd_links(pid) if link.startswith("socket:[")}


def _inodes_connected_to(port: int) -> set[str]:
    """Inodes of TCP sockets whose remote port is `port` (columns of /proc/net/tcp)."""
    inodes = set()
    for table in _TCP_TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes
