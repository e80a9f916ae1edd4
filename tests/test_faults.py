"""Faults an operator will meet, with real processes: Redis restarted during a progress
report, a half-open Redis link, Redis frozen, the database locked, the disk full, and
hostile input through `send_task`.

Every recording scenario ends the same way: every trade id the fake exchange sent in
the window is stored exactly once, and no group ever had two live connections (no
rotation happens in these tests, so the fake's per-stream-set maximum must be 1).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy.engine import Engine

from tests.conftest import call, clean_env, fake_stats, launch_stack, status_command, stored_ids, wait_until
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_stack import CELERY, LocalStack
from worker.store.storage import make_engine

pytestmark = pytest.mark.slow

NO_BACKFILL = {"BACKFILL_INTERVAL_SECONDS": "3600"}


class HalfOpenProxy:
    """A TCP proxy that, once frozen, stops forwarding without closing anything.

    What a failing-over cloud Redis or a NAT that forgot the flow looks like from the
    client: connects succeed, writes succeed, no reply ever comes. Bytes that arrive
    while frozen are dropped, so a connection that lived through the freeze stays
    broken afterwards, as a real half-open one does.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.frozen.is_set():
                    sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def group_status(stack: LocalStack, gid: str) -> dict[str, str]:
    return GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys("recorder")).status(gid)


def assert_every_trade_stored_once(stack: LocalStack, db: Engine, symbol: str) -> dict[str, int]:
    """Wait for the window the fake sent to be stored exactly once; returns the figures."""
    sent = fake_stats(stack)["sent"][symbol]["trade"]
    expected = sent["last"] - sent["first"] + 1
    wait_until(
        lambda: stored_ids(db, "trade", symbol, sent["first"], sent["last"]) == (expected, expected),
        60,
        f"{symbol} trades {sent['first']}..{sent['last']} stored exactly once",
    )
    most = max(fake_stats(stack)["connections"]["max_open_per_streamset"].values())
    assert most == 1, f"{most} live connections for one group at once"
    figures = {"expected": expected, "stored": expected, "distinct": expected, "max_connections": most}
    print(f"{symbol}: {figures}")
    return figures


def backfill_what_the_fence_missed(stack: LocalStack, db: Engine, symbol: str) -> None:
    """Run the gap repair (beat's backfill is off) once trades after the hole are stored:
    it repairs holes between stored ids of the streams still subscribed."""
    last = fake_stats(stack)["sent"][symbol]["trade"]["last"]
    wait_until(lambda: stored_ids(db, "trade", symbol, last, last)[0], 60, "trades after the hole")
    call(stack, "tasks.backfill")


def subscribe_and_wait(stack: LocalStack, symbol: str, streams: list[str]) -> str:
    gid: str = call(stack, "tasks.subscribe", [symbol], streams=streams)["groups"][0]
    wait_until(lambda: group_status(stack, gid).get("state") == "connected", 30, "the group to connect")
    return gid


def unsubscribe_and_wait(stack: LocalStack, symbol: str) -> None:
    call(stack, "tasks.unsubscribe", [symbol])
    wait_until(lambda: fake_stats(stack)["connections"]["open"] == 0, 20, "the connections to close")


def redis_port(stack: LocalStack) -> int:
    return int(stack.env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])


def start_default_worker(stack: LocalStack, name: str = "worker") -> None:
    stack.spawn(name, [*CELERY, "worker", "-Q", "celery", "-c", "2", "-n", f"{name}@%h", "-l", "INFO"])
    stack.wait_for_workers([name])


def replace_dead_default_worker(stack: LocalStack) -> None:
    """Start a new default worker if the old one died, as compose's restart policy does.

    kombu 5.7.0 kills a worker that loses its broker while it holds reserved messages
    (`Unrecoverable error: AttributeError("'NoneType' object has no attribute
    'hostname'")` while restoring them); that is not the recording path under test.
    Such a worker was seen alive 7 s after the error, while the test suite loaded the
    machine (it exited 0.9 s after Redis was back): checking that it is gone missed it.
    """
    worker = stack.process("worker")
    if "Unrecoverable error" in worker.log_text():
        stack.stop_process(worker)  # exiting; or still not, seconds later, under the suite's load
        start_default_worker(stack, "worker-restarted")


def test_a_redis_restart_during_a_progress_report_keeps_the_task_and_its_frames(tmp_path: Path) -> None:
    # The lease outlives the outage (its fence would otherwise close the connection),
    # and backfill is off: every trade must come from the frames held in memory.
    stack = launch_stack(
        tmp_path / "restart",
        fake_args=["--trades-per-second", "20"],
        env={**NO_BACKFILL, "LEASE_TTL_SECONDS": "20"},
        stream_concurrency=2,
    )
    try:
        db = make_engine(stack.env["DATABASE_URL"])
        subscribe_and_wait(stack, "BTCUSDT", ["trade", "ticker"])
        time.sleep(2)
        port = redis_port(stack)
        stack.stop_process(stack.process("redis"))
        time.sleep(7)  # longer than the 5 s between progress reports: one falls inside
        stack.start_redis(port)
        replace_dead_default_worker(stack)
        time.sleep(3)
        unsubscribe_and_wait(stack, "BTCUSDT")

        assert_every_trade_stored_once(stack, db, "BTCUSDT")
        assert fake_stats(stack)["connections"]["opened_total"] == 1  # the task and its connection lived on
        assert "progress report failed" in stack.process("worker-streams").log_tail(10_000)
    finally:
        stack.stop()


def start_stack_with_proxied_streams_worker(directory: Path) -> tuple[LocalStack, HalfOpenProxy]:
    """Redis, the fake, beat, the default worker, and a streams worker whose every Redis
    connection (broker, results, the service's own) goes through a HalfOpenProxy."""
    stack = LocalStack(directory, env=clean_env(NO_BACKFILL))
    direct = stack.start_redis()
    stack.start_fake_exchange(["--trades-per-second", "20"])
    proxy = HalfOpenProxy(redis_port(stack))
    stack.env["REDIS_URL"] = proxy.url
    stack.start_stream_worker(2)
    stack.env["REDIS_URL"] = direct
    start_default_worker(stack)
    stack.start_beat()
    stack.wait_for_workers(["worker-streams"])
    return stack, proxy


def test_a_half_open_redis_link_never_gives_a_group_two_connections(tmp_path: Path) -> None:
    stack, proxy = start_stack_with_proxied_streams_worker(tmp_path / "half-open")
    try:
        db = make_engine(stack.env["DATABASE_URL"])
        gid = subscribe_and_wait(stack, "BTCUSDT", ["trade"])
        stack.start_stream_worker(2, name="worker-streams-2")  # direct: where the group can move
        stack.wait_for_workers(["worker-streams-2"])
        time.sleep(2)

        proxy.frozen.set()
        wait_until(lambda: fake_stats(stack)["connections"]["opened_total"] >= 2, 45, "a copy on the other worker")
        wait_until(lambda: fake_stats(stack)["connections"]["open"] == 1, 20, "the new copy to connect")
        time.sleep(5)
        proxy.frozen.clear()
        wait_until(
            lambda: "lease lost to another task" in stack.process("worker-streams").log_tail(10_000),
            60,
            "the cut-off copy to see its lease taken and exit",
        )
        time.sleep(2)
        assert group_status(stack, gid)["state"] == "connected"  # the loser did not write `stopped`
        shown = status_command(stack)
        print(shown.stdout)
        assert shown.returncode == 0, shown.stdout

        # Trades missed between the fence and the new connection are filled by backfill.
        backfill_what_the_fence_missed(stack, db, "BTCUSDT")
        unsubscribe_and_wait(stack, "BTCUSDT")
        assert_every_trade_stored_once(stack, db, "BTCUSDT")
    finally:
        stack.stop()
        proxy.close()


def test_redis_frozen_loses_nothing_and_never_opens_a_second_connection(tmp_path: Path) -> None:
    stack = launch_stack(tmp_path / "frozen", fake_args=["--trades-per-second", "20"], env=NO_BACKFILL)
    try:
        db = make_engine(stack.env["DATABASE_URL"])
        subscribe_and_wait(stack, "BTCUSDT", ["trade"])
        time.sleep(2)
        redis_process = stack.process("redis").popen
        redis_process.send_signal(signal.SIGSTOP)
        time.sleep(6)  # twice the lease TTL: leases expire in Redis meanwhile
        redis_process.send_signal(signal.SIGCONT)
        time.sleep(4)
        backfill_what_the_fence_missed(stack, db, "BTCUSDT")
        unsubscribe_and_wait(stack, "BTCUSDT")
        assert_every_trade_stored_once(stack, db, "BTCUSDT")
    finally:
        stack.stop()


def status_json(stack: LocalStack) -> tuple[int, dict[str, object]]:
    shown = status_command(stack, "--json")
    return shown.returncode, json.loads(shown.stdout)


def wait_for_storage_problem(stack: LocalStack, words: str) -> str:
    """Wait for `status` to report the storage failure; returns what it printed."""
    shown = wait_until(
        lambda: (r := status_command(stack)).returncode == 1 and "the drain cannot store" in r.stdout and r,
        40,
        "status to report the storage failure",
    )
    assert words in shown.stdout, shown.stdout
    code, snapshot = status_json(stack)
    assert code == 1 and snapshot["storage_error"] and not snapshot["healthy"]
    print(shown.stdout)
    return str(shown.stdout)


def wait_for_healthy(stack: LocalStack) -> None:
    wait_until(lambda: status_command(stack).returncode == 0, 60, "status to be healthy again")


def test_a_locked_database_is_a_problem_in_status_and_loses_nothing(tmp_path: Path) -> None:
    stack = launch_stack(
        tmp_path / "locked",
        fake_args=["--trades-per-second", "20"],
        env={**NO_BACKFILL, "SQLITE_BUSY_TIMEOUT_MS": "500"},
    )
    try:
        db = make_engine(stack.env["DATABASE_URL"])
        subscribe_and_wait(stack, "BTCUSDT", ["trade"])
        wait_until(lambda: stored_ids(db, "trade", "BTCUSDT", 0, 2**62)[0] > 0, 20, "the first rows")
        database = stack.env["DATABASE_URL"].removeprefix("sqlite:///")
        locker = subprocess.Popen(
            [
                "python3",
                "-c",
                "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1]); "
                "c.execute('begin exclusive'); print('locked', flush=True); time.sleep(3600)",
                database,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
            shown = wait_for_storage_problem(stack, "database is locked")
            assert "find it" in shown
        finally:
            locker.kill()
            locker.wait()
        wait_for_healthy(stack)
        unsubscribe_and_wait(stack, "BTCUSDT")
        assert_every_trade_stored_once(stack, db, "BTCUSDT")
    finally:
        stack.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs the database can fill (needs root, as in CI's container)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it. Unbuffered, and the error
    suppressed around the file's close too: a buffered write left over when the disk
    filled fails again on close (ENOSPC, once in a clean-clone run)."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as out:
        while True:
            out.write(b"\0" * 65536)
    return filler


def test_a_full_disk_is_a_problem_in_status_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    stack = launch_stack(
        tmp_path / "full",
        fake_args=["--trades-per-second", "20"],
        env={**NO_BACKFILL, "DATABASE_URL": f"sqlite:///{small_disk / 'binance.db'}"},
    )
    try:
        db = make_engine(stack.env["DATABASE_URL"])
        subscribe_and_wait(stack, "BTCUSDT", ["trade", "ticker"])
        wait_until(lambda: stored_ids(db, "trade", "BTCUSDT", 0, 2**62)[0] > 0, 20, "the first rows")
        filler = fill(small_disk)
        try:
            shown = wait_for_storage_problem(stack, "full")
            assert "free space" in shown
            _, first = status_json(stack)
            time.sleep(3)
            _, later = status_json(stack)
            assert later["backlog"] > first["backlog"]  # type: ignore[operator]
        finally:
            filler.unlink()
        wait_for_healthy(stack)
        unsubscribe_and_wait(stack, "BTCUSDT")
        assert_every_trade_stored_once(stack, db, "BTCUSDT")
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def quiet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("input"), fake_args=["--extra-symbols", "300"])
    yield stack
    stack.stop()


def subscribe_error(stack: LocalStack, *args: object, **kwargs: object) -> str:
    result = client_app(stack.env["REDIS_URL"]).send_task("tasks.subscribe", args=args, kwargs=kwargs)
    with pytest.raises(Exception) as raised:  # noqa: PT011 (the type is the worker's, rebuilt by Celery)
        result.get(timeout=60)
    return str(raised.value)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((None,), {}, "symbols must be a list of strings such as ['BTCUSDT'], got None"),
        ((7,), {}, "symbols must be a list of strings such as ['BTCUSDT'], got 7"),
        (([123, True, None],), {}, "symbols[0] is 123 (int), not a string"),
        ((["BTCUSDT", None],), {}, "symbols[1] is None (NoneType), not a string"),
        ((["BTCUSDT"],), {"streams": [7]}, "streams[0] is 7 (int), not a string"),
        ((["BTCUSDT"],), {"streams": ["trade", None]}, "streams[1] is None (NoneType), not a string"),
        ((["BTCUSDT"],), {"streams": "trade"}, "streams must be a list, got the string 'trade'"),
        ((["BTCUSDT"],), {"streams": ["trade", "trades"]}, "streams[1]: unknown stream kind 'trades'"),
    ],
)
def test_hostile_input_is_refused_with_one_message_naming_the_bad_element(
    quiet_stack: LocalStack, args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    assert message in subscribe_error(quiet_stack, *args, **kwargs)


def test_duplicates_never_make_a_second_group_or_a_repeated_stream(quiet_stack: LocalStack) -> None:
    stack = quiet_stack
    first = call(stack, "tasks.subscribe", ["ETHUSDT", "ethusdt"], streams=["trade", "TRADE", "trade", "aggtrade"])
    assert first["streams"] == ["ethusdt@trade", "ethusdt@aggTrade"]
    again = call(stack, "tasks.subscribe", ["ETHUSDT"], streams=["aggTrade", "trade", "trade"])
    assert again["new_groups"] == [] and again["groups"] == first["groups"]
    wanted = GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys("recorder")).wanted()
    assert [sorted(g.streams) for g in wanted.values()] == [["ethusdt@aggTrade", "ethusdt@trade"]]
    wait_until(lambda: fake_stats(stack)["connections"]["open"] == 1, 20, "the one connection")
    call(stack, "tasks.unsubscribe", ["ETHUSDT"])


def test_many_symbols_are_checked_with_one_request(quiet_stack: LocalStack) -> None:
    stack = quiet_stack
    before = fake_stats(stack)["rest"]["requests"]
    unknown = [f"NOPE{i}USDT" for i in range(100_000)]
    error = subscribe_error(stack, ["SYM0001USDT", *unknown], streams=["trade"])
    assert error.startswith("100000 unknown symbols: NOPE0USDT, NOPE1USDT, ")
    assert "NOPE4999USDT and 95000 more: Binance says 'Invalid symbol.'" in error
    assert fake_stats(stack)["rest"]["requests"] - before == 1


def test_periodic_runs_keep_no_results_and_status_shows_redis_memory(quiet_stack: LocalStack) -> None:
    stack = quiet_stack
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    results_before = set(client.keys("celery-task-meta-*"))
    time.sleep(5)  # ten drain runs at 0.5 s, two supervise runs
    assert set(client.keys("celery-task-meta-*")) == results_before
    called = client_app(stack.env["REDIS_URL"]).send_task("tasks.supervise")
    called.get(timeout=30)  # a result someone waits for is kept, for a day
    assert 0 < client.ttl(f"celery-task-meta-{called.id}") <= 86400

    assert "redis memory:" in status_command(stack).stdout
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", int(used / 0.9))
    try:
        shown = status_command(stack)
        assert shown.returncode == 1 and "of its maxmemory" in shown.stdout, shown.stdout
    finally:
        client.config_set("maxmemory", 0)
