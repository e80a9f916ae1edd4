"""`binance-recorder run` owns its processes, as a user meets it: Ctrl-C, `kill`, a closed
terminal (SIGHUP), an output pipe whose reader exits and `kill -9` all leave no process
of the stack behind, the workers stopped together before Redis and the fake; what a killed
run did leave is stopped by the next `run` or by `binance-recorder stop`; a process of the
stack that dies while run runs is restarted.

Processes are found as `pgrep` would: the ones data/stack.json records, the members of
their process groups (a worker's pool), and any whose environment or working directory
names the data directory (every child inherits run's DATABASE_URL; Redis, which writes
its title over its environment, works in data/redis)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.test_restart import Run, second_shell, wait_recording
from worker.ops.local_stack import LocalStack, RestartPolicy, free_port
from worker.ops.stack_record import RecordedProcess, StackRecord

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="finds processes in /proc")

SMALL = {"STREAM_WORKER_CONCURRENCY": "2"}


def stack_processes(directory: Path) -> set[RecordedProcess]:
    """Every process of the stack of the run in `directory` (see the module's docstring)."""
    data = directory / "data"
    record = StackRecord.load(data)
    leaders = {process.pid for process in record.processes} if record else set()
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except (OSError, ValueError):  # not a process, or gone meanwhile
            continue
        name, fields = stat.split(" (", 1)[1].rsplit(") ", 1)
        if int(fields.split()[2]) in leaders or str(data).encode() in environ or cwd.startswith(str(data)):
            found.add(RecordedProcess.of(name, int(entry.name)))
    return {process for process in found if process.started}


def still_running(processes: set[RecordedProcess]) -> list[str]:
    return sorted(f"{process.pid} {process.name}" for process in processes if process.running())


def recorded(directory: Path, name: str) -> RecordedProcess:
    record = StackRecord.load(directory / "data")
    assert record is not None
    return next(process for process in record.processes if process.name == name)


ENDINGS = {
    "SIGINT": (lambda run: run.popen.send_signal(signal.SIGINT), 0),  # Ctrl-C
    "SIGTERM": (lambda run: run.popen.send_signal(signal.SIGTERM), 0),  # kill
    "SIGHUP": (lambda run: run.popen.send_signal(signal.SIGHUP), 0),  # the terminal closed
    "closed-output": (Run.close_output, 141),  # `| head` exits
    "SIGKILL": (lambda run: run.popen.kill(), -signal.SIGKILL),  # the kernel signals the children
}


@pytest.mark.slow
def test_every_stop_signal_a_closed_output_and_kill_9_leave_no_process_behind(tmp_path: Path) -> None:
    """Five runs at once, one for each way a run ends."""
    runs: dict[str, Run] = {}
    stacks: dict[str, set[RecordedProcess]] = {}
    try:
        for ending in ENDINGS:
            (tmp_path / ending).mkdir()
            runs[ending] = Run(tmp_path / ending, free_port(), free_port(), free_port(), SMALL)
        for ending, run in runs.items():
            wait_recording(run)
            stacks[ending] = stack_processes(tmp_path / ending)
    finally:
        for ending, run in runs.items():
            ENDINGS[ending][0](run)
    for ending, run in runs.items():
        assert run.popen.wait(60) == ENDINGS[ending][1], (ending, run.output())
    for ending, processes in stacks.items():
        names = {process.name for process in processes}
        assert "redis-server" in names and len(processes) >= 11, (ending, processes)  # the whole stack was seen
        wait_until(lambda left=processes: not still_running(left), 30, f"the stack to go after {ending}")
    assert "stopping ..." in runs["SIGHUP"].output()


@pytest.mark.slow
def test_what_a_killed_run_left_is_stopped_by_the_next_run_which_restarts_a_dead_beat(tmp_path: Path) -> None:
    """The stack of a killed run that outlived it (stopped processes here, which cannot act on
    the kernel's SIGTERM; on systems without PR_SET_PDEATHSIG, any) is found from stack.json.
    The next run, under nohup, does not stop on SIGHUP; `binance-recorder stop` stops it."""
    ports = free_port(), free_port(), free_port()  # Redis, Flower, metrics
    killed = Run(tmp_path, *ports, SMALL)
    try:
        wait_recording(killed)
        leftovers = StackRecord.load(tmp_path / "data")
        assert leftovers is not None and len(leftovers.processes) == 7
        left = stack_processes(tmp_path)
        for process in leftovers.processes:
            os.kill(process.pid, signal.SIGSTOP)
    finally:
        killed.popen.kill()
    assert killed.popen.wait(30) == -signal.SIGKILL
    assert len(still_running(left)) == len(left)  # the whole stack is left, holding both ports

    again = Run(tmp_path, *ports, SMALL, nohup=True)  # the same ports
    try:
        wait_recording(again)
        assert again.lines[0] == (
            f"stopped the stack that run {leftovers.owner.pid} left when it was killed in {tmp_path / 'data'}: "
            "redis, fake-exchange, worker-streams, worker, beat, flower, metrics"
        ), again.output()
        assert still_running(left) == []

        beside = Run(tmp_path, free_port(), free_port(), free_port(), SMALL)
        assert beside.popen.wait(60) == 3
        assert beside.lines == [
            f"error: a binance-recorder run (pid {again.popen.pid}) already uses {tmp_path / 'data'}: stop it first "
            f"(Ctrl-C there, or `binance-recorder stop --data-dir {tmp_path / 'data'}`)"
        ]

        again.popen.send_signal(signal.SIGHUP)  # ignored under nohup: it runs on and restarts beat below
        beat = recorded(tmp_path, "beat")
        os.kill(beat.pid, signal.SIGKILL)
        said = r"^beat exited \(killed by SIGKILL\) after \d+s; restarting it now$"
        wait_until(lambda: again.line(said), 30, "the line that beat is restarted")
        restarted = wait_until(lambda: recorded(tmp_path, "beat") != beat and recorded(tmp_path, "beat"), 30, "beat")
        assert restarted.running()
        log = tmp_path / "data" / "logs" / "beat.log"
        wait_until(lambda: log.read_text().count("beat: Starting...") == 3, 30, "the new beat to start")
        assert again.popen.poll() is None  # the stack runs on
        stack = stack_processes(tmp_path)
    finally:
        stopped = second_shell(tmp_path, "stop")
    assert (stopped.returncode, stopped.stderr) == (0, ""), stopped.stdout
    assert stopped.stdout == (
        f"stopped the stack of run {again.popen.pid} in {tmp_path / 'data'}: "
        "redis, fake-exchange, worker-streams, worker, beat, flower, metrics\n"
    )
    assert again.popen.wait(30) == 0 and again.lines[-1] == "stopping ...", again.output()
    assert still_running(stack) == []
    nothing = second_shell(tmp_path, "stop")
    assert (nothing.returncode, nothing.stdout) == (0, f"no stack running in {tmp_path / 'data'}\n")


def test_a_process_that_keeps_dying_is_restarted_ever_later_up_to_a_minute() -> None:
    policy = RestartPolicy()
    assert [policy.delay("beat", lived=0.5) for _ in range(9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.delay("beat", lived=10) == 0  # it ran long enough: the next death restarts it at once
    assert policy.delay("worker", lived=0.5) == 0  # each process has its own count


SLOW_TO_STOP = """
import signal, sys, time
def stop(*_):
    print("term", time.monotonic_ns(), flush=True)
    time.sleep(0.5)  # a warm shutdown
    print("exit", time.monotonic_ns(), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_stop_signals_the_workers_together_and_redis_and_the_fake_after_they_exited(tmp_path: Path) -> None:
    """The processes that use Redis and the fake exchange all get SIGTERM before any of them
    has finished shutting down; Redis and the fake get theirs once every one has exited."""
    stack = LocalStack(tmp_path)
    names = ["redis", "fake-exchange", "worker-streams", "worker", "beat", "flower"]
    try:
        processes = [stack.spawn(name, [sys.executable, "-c", SLOW_TO_STOP]) for name in names]
        for process in processes:
            wait_until(lambda p=process: "ready" in p.log_text(), 30, f"{process.name} to start")
    finally:
        stack.stop()

    def moment(name: str, event: str) -> int:
        line = next(line for line in processes[names.index(name)].log_text().splitlines() if line.startswith(event))
        return int(line.split()[1])

    users, services = names[2:], names[:2]
    assert max(moment(name, "term") for name in users) < min(moment(name, "exit") for name in users)
    assert min(moment(name, "term") for name in services) > max(moment(name, "exit") for name in users)
    assert StackRecord.load(tmp_path) is None
