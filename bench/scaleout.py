"""Scale-out on one machine: separate Celery nodes, as if on several hosts, sharing one
Redis and one PostgreSQL; storage throughput with one drain worker and with two.

What runs, each a process of its own (LocalStack): a private PostgreSQL cluster (a
fresh database), one redis-server, the fake exchange with 1,536 generated symbols,
beat, two streams worker nodes (`-Q streams -n streams1@%h`, `streams2@%h`, two
processes each) and one or two default worker nodes (`-Q celery -n default1@%h`,
`default2@%h`, two processes each). Every one gets DATABASE_URL (the PostgreSQL URL)
and REDIS_URL, as it would on another host.

The symbols' trade and aggTrade streams (3,072) are cut by `subscribe` into three
groups of 1,024 streams, one connection each, spread over the two streams nodes.

A drain on this machine stores faster than the fake exchange can send, so storage
throughput is measured on a backlog: with no default node consuming, the streams nodes
record (at `pile_rate`) until `backlog_frames` wait in the Redis lists. The default
node(s) start meanwhile on a queue nothing is sent to (STANDBY_QUEUE) and, once all are
ready, take the default queue together (`celery control add_consumer`), so no node's
start-up falls into the timed window. The rows stored in PostgreSQL per second are
timed from the first commit until the backlog is gone, while frames keep arriving (at
`rate`). One default node with DRAIN_LANES=1, and two default nodes with DRAIN_LANES=2
(up to that many drain runs store at once on PostgreSQL; a service that does not know
the setting ignores it and stores with one run at a time), `rounds` times each, in the
order one, two, two, one, ... so that a drift of the machine's load cancels. The CPU
the stack's processes and other programs used in each window is reported with it: on
a shared machine the second figure explains most of the spread.

Afterwards every trade and aggregate-trade id the fake sent (GET /fake/stats) must be
in PostgreSQL exactly once. The periodic backfill is off, so nothing is repaired from
REST behind the measurement's back.

    .venv/bin/python -m bench.scaleout            # about 3 minutes; --output FILE for the JSON
    .venv/bin/python -m bench.scaleout --quick    # under a minute, what tests/test_scaleout.py runs

or from Python (what `python -m bench` can call as a part): `measure_scaleout(workdir,
quick=...)` starts and stops everything under `workdir` and returns the figures as a
dict; `scaleout_table(figures)` renders them as text.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import redis
import requests

from bench.frames import KINDS
from bench.procs import children, cpu_seconds, service_env
from bench.service import settle
from fake_binance.config import FakeExchangeConfig
from worker.keys import RedisKeys, as_text
from worker.ops.clients import client_app
from worker.ops.local_postgres import start_private_server
from worker.ops.local_stack import CELERY, LocalStack, ManagedProcess
from worker.ops.status import group_statuses
from worker.store.drain import drain_holders

SYMBOLS = 1536
"""× trade and aggTrade = 3,072 streams: three groups of 1,024, one connection each."""
STREAM_NODES = ("streams1", "streams2")
DEFAULT_NODES = ("default1", "default2")
PROCESSES_PER_NODE = 2
NO_BACKFILL_SECONDS = 86400 * 365
TASK_TIMEOUT_SECONDS = 120.0
CONNECT_TIMEOUT_SECONDS = 90.0
CATCH_UP_TIMEOUT_SECONDS = 120.0
SETTLE_TIMEOUT_SECONDS = 90.0
POLL_SECONDS = 0.1
STANDBY_QUEUE = "scaleout-standby"
"""What default nodes consume while they start: nothing is ever sent to it."""
ID_COLUMNS = {"trade": ("trades", "trade_id"), "aggTrade": ("agg_trades", "agg_id")}


@dataclass(frozen=True)
class ScaleoutSize:
    rate: float
    """Messages per second the fake offers over all 3,072 streams."""
    warmup_seconds: float
    """Recording with a drain running, before the first backlog is built."""
    pile_rate: float
    """Messages per second offered while the backlog builds up (no drain running)."""
    backlog_frames: int
    """The backlog each configuration starts from (at least: more if its nodes take longer to start)."""
    rounds: int
    """Each configuration measured this many times: one drain node first, then the other
    order in the next round, and so on."""


QUICK_SCALEOUT = ScaleoutSize(rate=5000, warmup_seconds=2, pile_rate=15000, backlog_frames=60_000, rounds=1)
# A drain stores a batch of 5,000 frames per group per round: 300,000 frames is about 20
# rounds, so that where the timed window starts and ends within a round matters little.
# Built at 15,000 msg/s (the machine is free of the drain meanwhile), stored at 5,000.
FULL_SCALEOUT = ScaleoutSize(rate=5000, warmup_seconds=5, pile_rate=15000, backlog_frames=300_000, rounds=2)


class Scaleout:
    """The running nodes, seen from outside as an operator (or another host) sees them."""

    def __init__(self, stack: LocalStack, database_url: str, postgres_pid: int) -> None:
        self.stack = stack
        self.postgres_pid = postgres_pid
        self.redis = redis.Redis.from_url(stack.env["REDIS_URL"])
        self.keys = RedisKeys("recorder")
        self.rest_url = stack.env["BINANCE_REST_URL"]
        self.pg_url = database_url.replace("+psycopg", "")

    # -- nodes ------------------------------------------------------------------------

    def start_default_nodes(self, names: tuple[str, ...], lanes: int, queue: str = "celery") -> list[ManagedProcess]:
        """Default-queue worker nodes (the drain and the rest), each with DRAIN_LANES=lanes,
        consuming `queue` (STANDBY_QUEUE: nothing, until `consume`)."""
        self.stack.env["DRAIN_LANES"] = str(lanes)  # read by spawn: the nodes started now
        nodes = [
            self.stack.spawn(
                name,
                [*CELERY, "worker", "-Q", queue, "-c", str(PROCESSES_PER_NODE), "-n", f"{name}@%h", "-l", "INFO"],
            )
            for name in names
        ]
        self.stack.wait_for_workers(names)
        return nodes

    def consume(self, names: tuple[str, ...], queue: str = "celery") -> None:
        """`celery control add_consumer`: the ready nodes start taking `queue`'s tasks."""
        destination = [f"{name}@{socket.gethostname()}" for name in names]  # what %h stands for
        app = client_app(self.stack.env["REDIS_URL"])
        replies = app.control.add_consumer(queue, destination=destination, reply=True, timeout=5.0)
        if len(replies) != len(destination):
            raise RuntimeError(f"add_consumer {queue}: {destination} asked, {replies} answered")

    def stop_nodes(self, nodes: list[ManagedProcess]) -> None:
        """Warm shutdown (SIGTERM), as `docker stop`: a drain run finishes its round."""
        for node in nodes:
            self.stack.stop_process(node)
            self.stack.processes.remove(node)

    def ping(self) -> list[str]:
        """The nodes that answer `celery inspect ping`."""
        replies = client_app(self.stack.env["REDIS_URL"]).control.ping(timeout=2.0)
        return sorted(name for reply in replies for name in reply)

    def recording_tasks_per_node(self) -> dict[str, int]:
        """`celery inspect active`: how many tasks.stream_group each node runs."""
        active = client_app(self.stack.env["REDIS_URL"]).control.inspect(timeout=2.0).active() or {}
        return {
            node: sum(1 for task in tasks if task.get("name") == "tasks.stream_group")
            for node, tasks in sorted(active.items())
        }

    # -- the service's state ---------------------------------------------------------

    def call(self, task: str, *args: object, **kwargs: object) -> Any:
        result = client_app(self.stack.env["REDIS_URL"]).send_task(task, args=args, kwargs=kwargs)
        return result.get(timeout=TASK_TIMEOUT_SECONDS)

    def set_rate(self, messages_per_second: float) -> None:
        """The fake's rate over every stream: per symbol, half of it trades, half aggTrades."""
        body = {"action": "set_rate", "trades_per_second": messages_per_second / SYMBOLS / len(KINDS)}
        requests.post(f"{self.rest_url}/fake/control", json=body, timeout=10).raise_for_status()

    def fake_stats(self) -> dict[str, Any]:
        return requests.get(f"{self.rest_url}/fake/stats", timeout=30).json()

    def groups(self) -> list[dict[str, Any]]:
        return group_statuses(self.redis, self.keys)

    def backlog(self) -> int:
        keys = [as_text(key) for key in self.redis.smembers(self.keys.buffers)]
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
            return sum(int(n) for n in pipe.execute())

    def received(self) -> int:
        """Frames the subscription tasks have pushed to Redis so far (all groups)."""
        gids = list(self.groups_wanted())
        with self.redis.pipeline(transaction=False) as pipe:
            for gid in gids:
                pipe.hget(self.keys.status(gid), "messages")
            return sum(int(n or 0) for n in pipe.execute())

    def groups_wanted(self) -> list[str]:
        return [group["id"] for group in self.groups()]

    def lane_nodes(self, lanes: int) -> set[str]:
        """The worker nodes whose drain runs hold a lane now (`status` shows the same)."""
        return {
            holder.split("@", 1)[-1].split("@")[0] for holder in drain_holders(self.redis, self.keys, lanes).values()
        }

    def frames_drained(self) -> int:
        return int(self.redis.hget(self.keys.counters, "frames_drained") or 0)

    def rows(self) -> int:
        """Rows in PostgreSQL's trade tables, counted (both tables in one snapshot)."""
        with psycopg.connect(self.pg_url) as conn:
            row = conn.execute("SELECT (SELECT count(*) FROM trades) + (SELECT count(*) FROM agg_trades)").fetchone()
        return int(row[0]) if row else 0


def measure_scaleout(
    workdir: Path, quick: bool = False, size: ScaleoutSize | None = None, drain_interval: float = 1.0
) -> dict[str, Any]:
    """Start everything under `workdir`, measure, stop everything; returns the figures."""
    size = size or (QUICK_SCALEOUT if quick else FULL_SCALEOUT)
    started = time.monotonic()
    _progress("scaleout: PostgreSQL, Redis, the fake exchange, beat, 2 streams nodes, 1 default node")
    with _postgres() as (database_url, postgres_pid):
        env = service_env(
            database_url=database_url,
            drain_interval_seconds=drain_interval,
            backfill_interval_seconds=NO_BACKFILL_SECONDS,
            stream_worker_concurrency=PROCESSES_PER_NODE,
        )
        with LocalStack(workdir / "scaleout", env=env) as stack:
            stack.start_redis()
            stack.start_fake_exchange(["--extra-symbols", str(SYMBOLS)])
            stack.start_beat()
            for name in STREAM_NODES:
                stack.start_stream_worker(PROCESSES_PER_NODE, name=name)
            nodes = Scaleout(stack, database_url, postgres_pid)
            defaults = nodes.start_default_nodes(DEFAULT_NODES[:1], lanes=1)
            stack.wait_for_workers(STREAM_NODES)
            _progress(f"scaleout: subscribing {SYMBOLS} symbols x {', '.join(KINDS)} at {size.rate:g} msg/s")
            recording = _subscribe(nodes, size)
            time.sleep(size.warmup_seconds)
            nodes.stop_nodes(defaults)
            target = size.backlog_frames
            rounds: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            for number in range(1, size.rounds + 1):
                order = (1, 2) if number % 2 else (2, 1)  # one, two, two, one: a drift in time cancels
                for count in order:
                    _progress(
                        f"scaleout: round {number}/{size.rounds}: backlog of {target:,} frames, "
                        f"then {count} default node(s), DRAIN_LANES={count}"
                    )
                    defaults, figures = _drain_phase(nodes, DEFAULT_NODES[:count], count, size)
                    rounds[count].append(figures)
                    if (number, count) != (size.rounds, order[-1]):
                        nodes.stop_nodes(defaults)
            all_nodes = nodes.ping()
            nodes.call("tasks.unsubscribe", _symbols())
            settle(nodes, SETTLE_TIMEOUT_SECONDS)
            ids = _compare_with_sent(nodes)
    one, two = _combined(rounds[1]), _combined(rounds[2])
    one_rate, two_rate = one["rows_per_second"], two["rows_per_second"]
    return {
        "symbols": SYMBOLS,
        "streams": SYMBOLS * len(KINDS),
        "streams_per_group": recording["streams_per_group"],
        "offered_messages_per_second": size.rate,
        "pile_messages_per_second": size.pile_rate,
        "target_backlog_frames": size.backlog_frames,
        "rounds": size.rounds,
        "drain_interval_seconds": drain_interval,
        "recording": recording,
        "nodes_answering_ping": all_nodes,
        "one_drain": one,
        "two_drains": two,
        "ratio": two_rate / one_rate if one_rate else None,
        "round_ratios": [
            b["rows_per_second"] / a["rows_per_second"] if a["rows_per_second"] else None
            for a, b in zip(rounds[1], rounds[2], strict=True)
        ],
        "ids": ids,
        "seconds": time.monotonic() - started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }


@contextlib.contextmanager
def _postgres() -> Iterator[tuple[str, int]]:
    """A private PostgreSQL cluster with a fresh database, durable as in production (as
    `python -m bench --postgres` runs it); yields its SQLAlchemy URL and the server's
    process id."""
    server = start_private_server(durable=True)
    try:
        yield server.create_database(), int((server.data / "postmaster.pid").read_text().split()[0])
    finally:
        server.stop()


def _symbols() -> list[str]:
    return [s for s in FakeExchangeConfig(extra_symbols=SYMBOLS).all_symbols() if s.startswith("SYM")]


def _subscribe(nodes: Scaleout, size: ScaleoutSize) -> dict[str, Any]:
    """Subscribe every stream; wait until the three groups are connected and stored."""
    nodes.set_rate(size.rate)
    subscribed = nodes.call("tasks.subscribe", _symbols(), streams=list(KINDS))
    deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
    while True:
        groups = nodes.groups()
        connected = [g for g in groups if g["state"] == "connected" and g["live"] and g["messages"]]
        if len(connected) == len(subscribed["groups"]) and nodes.frames_drained():
            break
        if time.monotonic() > deadline:
            states = {g["id"]: g["state"] for g in groups}
            raise RuntimeError(f"the groups did not all record within {CONNECT_TIMEOUT_SECONDS:.0f}s: {states}")
        time.sleep(0.25)
    return {
        "groups": len(groups),
        "streams_per_group": sorted(g["streams"] for g in groups),
        "recording_tasks_per_node": nodes.recording_tasks_per_node(),
    }


def _drain_phase(
    nodes: Scaleout, names: tuple[str, ...], lanes: int, size: ScaleoutSize
) -> tuple[list[ManagedProcess], dict[str, Any]]:
    """Let the backlog grow to `size.backlog_frames` with no drain running (at
    `size.pile_rate`), then have the default nodes `names` consume, and time the rows
    they store until it is gone, while frames go on arriving at `size.rate`.

    The nodes start meanwhile on a queue nothing is sent to, and all take the default
    queue at once when they are ready: a node's start-up (a few seconds of CPU) is
    neither storage nor allowed to slow the other node's drain in the timed window."""
    nodes.set_rate(size.pile_rate)
    received_at_start, pile_started = nodes.received(), time.monotonic()
    started_nodes = nodes.start_default_nodes(names, lanes, queue=STANDBY_QUEUE)
    deadline = pile_started + CATCH_UP_TIMEOUT_SECONDS
    while nodes.backlog() < size.backlog_frames:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the backlog did not reach {size.backlog_frames:,} frames: is anything recording?")
        time.sleep(POLL_SECONDS)
    nodes.set_rate(size.rate)
    pile_incoming = (nodes.received() - received_at_start) / (time.monotonic() - pile_started)
    backlog_at_start, drained_before = nodes.backlog(), nodes.frames_drained()
    started, received_then = time.monotonic(), nodes.received()
    nodes.consume(names)
    # Storing starts with the first commit: timed from there, with the backlog left
    # then and the rows PostgreSQL holds then.
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_SECONDS
    while nodes.frames_drained() == drained_before:
        if time.monotonic() > deadline or not all(node.alive() for node in started_nodes):
            tails = "\n".join(f"{node.name}:\n{node.log_tail()}" for node in started_nodes)
            raise RuntimeError(f"no drain stored anything within {CATCH_UP_TIMEOUT_SECONDS:.0f}s:\n{tails}")
        time.sleep(POLL_SECONDS / 2)
    first_commit = time.monotonic()
    cpu = _CpuWindow(started_nodes, [p.popen.pid for p in nodes.stack.processes] + [nodes.postgres_pid])
    rows_then = nodes.rows()
    backlog_then = nodes.backlog()
    # Caught up: the lists hold no more than what arrives in about a fifth of a second
    # (a few flushes of the three groups).
    caught_up_below = max(1000, int(size.rate * 0.2))
    lane_nodes: set[str] = set()
    while True:
        lane_nodes |= nodes.lane_nodes(lanes)
        backlog = nodes.backlog()
        now = time.monotonic()
        if backlog <= caught_up_below:
            break
        if now > deadline:
            raise RuntimeError(f"the drain did not catch up within {CATCH_UP_TIMEOUT_SECONDS:.0f}s: {backlog:,} left")
        time.sleep(POLL_SECONDS)
    rows_now, received_now = nodes.rows(), nodes.received()
    seconds = now - first_commit
    cpu_used = cpu.shares()
    return started_nodes, {
        "default_nodes": len(names),
        "drain_lanes": lanes,
        # From add_consumer on: longer than the timed window, so it spans many flushes.
        "incoming_messages_per_second": (received_now - received_then) / (now - started),
        "pile_incoming_messages_per_second": pile_incoming,
        "backlog_frames": backlog_at_start,
        "backlog_at_first_commit": backlog_then,
        "caught_up_below_frames": caught_up_below,
        "rows_stored": rows_now - rows_then,
        "seconds": seconds,
        "rows_per_second": (rows_now - rows_then) / seconds if seconds > 0 else 0.0,
        "seconds_from_consume": now - started,
        "nodes_answering_ping": nodes.ping(),
        "nodes_holding_lanes": sorted(lane_nodes),
        **cpu_used,
    }


class _CpuWindow:
    """CPU used from now on, in cores: by each default node (its main process and pool
    processes), by everything the measurement started (every process of the stack and
    PostgreSQL's), and by the whole machine (/proc/stat): the difference is what other
    programs of a shared machine took."""

    def __init__(self, started_nodes: list[ManagedProcess], roots: list[int]) -> None:
        self.trees = {node.name: [node.popen.pid, *children(node.popen.pid)] for node in started_nodes}
        self.ours = [pid for root in roots for pid in _process_tree(root)]
        self.started = time.monotonic()
        self.node_cpu = {name: cpu_seconds(pids) for name, pids in self.trees.items()}
        self.our_cpu = cpu_seconds(self.ours)
        self.machine = _machine_ticks()

    def shares(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        busy, total = (now - then for now, then in zip(_machine_ticks(), self.machine, strict=True))
        machine_cores = (busy / total if total else 0.0) * (os.cpu_count() or 1)
        ours = (cpu_seconds(self.ours) - self.our_cpu) / seconds
        return {
            "node_cpu_cores": {
                name: (cpu_seconds(pids) - self.node_cpu[name]) / seconds for name, pids in self.trees.items()
            },
            "stack_cpu_cores": ours,
            "machine_busy_cores": machine_cores,
            "other_programs_cpu_cores": max(0.0, machine_cores - ours),
        }


def _process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children(current))
    return found


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot: the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def _combined(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's rounds: rows over seconds of all of them, the rest averaged."""
    rows, seconds = sum(r["rows_stored"] for r in rounds), sum(r["seconds"] for r in rounds)

    def mean(name: str) -> float:
        return sum(r[name] for r in rounds) / len(rounds)

    return {
        "default_nodes": rounds[0]["default_nodes"],
        "drain_lanes": rounds[0]["drain_lanes"],
        "rows_stored": rows,
        "seconds": seconds,
        "rows_per_second": rows / seconds if seconds > 0 else 0.0,
        "incoming_messages_per_second": mean("incoming_messages_per_second"),
        "pile_incoming_messages_per_second": mean("pile_incoming_messages_per_second"),
        "backlog_frames": min(r["backlog_frames"] for r in rounds),
        "backlog_at_first_commit": round(mean("backlog_at_first_commit")),
        "caught_up_below_frames": max(r["caught_up_below_frames"] for r in rounds),
        "seconds_from_consume": mean("seconds_from_consume"),
        "stack_cpu_cores": mean("stack_cpu_cores"),
        "other_programs_cpu_cores": mean("other_programs_cpu_cores"),
        "nodes_answering_ping": rounds[-1]["nodes_answering_ping"],
        "rounds": rounds,
    }


def _compare_with_sent(nodes: Scaleout) -> dict[str, Any]:
    """Every trade and aggregate-trade id the fake sent, against PostgreSQL: per symbol
    and kind, the ids first..last (the fake's ids are consecutive) each stored once."""
    sent = nodes.fake_stats()["sent"]
    summary = {"streams_checked": 0, "ids_sent": 0, "rows_stored": 0, "missing": 0, "extra": 0, "duplicates": 0}
    with psycopg.connect(nodes.pg_url) as conn:
        for kind, (table, column) in ID_COLUMNS.items():
            ranges = [(s, kinds[kind]["first"], kinds[kind]["last"]) for s, kinds in sent.items() if kind in kinds]
            if not ranges:
                continue
            symbols, firsts, lasts = (list(column_values) for column_values in zip(*ranges, strict=True))
            in_range, distinct = conn.execute(
                f"SELECT count(t.{column}), count(DISTINCT (t.symbol, t.{column})) "
                f"FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) AS s(symbol, first_id, last_id) "
                f"JOIN {table} t ON t.symbol = s.symbol AND t.{column} BETWEEN s.first_id AND s.last_id",
                (symbols, firsts, lasts),
            ).fetchone() or (0, 0)
            total, total_distinct = conn.execute(
                f"SELECT count(*), count(DISTINCT (symbol, {column})) FROM {table}"
            ).fetchone() or (0, 0)
            expected = sum(last - first + 1 for _, first, last in ranges)
            summary["streams_checked"] += len(ranges)
            summary["ids_sent"] += expected
            summary["rows_stored"] += total
            summary["missing"] += expected - distinct
            summary["extra"] += total - in_range
            summary["duplicates"] += total - total_distinct
    summary["lost_nothing"] = bool(summary["ids_sent"]) and summary["missing"] == summary["extra"] == 0
    summary["stored_once"] = summary["duplicates"] == 0
    return summary


def scaleout_table(figures: dict[str, Any]) -> str:
    """The figures as a few lines of text."""
    lines = [
        f"{figures['streams']:,} streams in {figures['recording']['groups']} groups "
        f"({'+'.join(str(n) for n in figures['streams_per_group'])}), "
        f"recording tasks per node {figures['recording']['recording_tasks_per_node']}",
        f"offered {figures['offered_messages_per_second']:,.0f} msg/s "
        f"({figures['pile_messages_per_second']:,.0f} while a backlog builds up); "
        f"machine: {figures['machine']['cpus']} cpus, everything on it",
    ]
    labels = {"one_drain": "1 default node, DRAIN_LANES=1", "two_drains": "2 default nodes, DRAIN_LANES=2"}
    for key, label in labels.items():
        phase = figures[key]
        per_round = ", ".join(f"{r['rows_per_second']:,.0f}" for r in phase["rounds"])
        node_cpu = "; ".join(
            " ".join(f"{name} {cores:.2f}" for name, cores in r["node_cpu_cores"].items())
            + f" (lanes held by {', '.join(r['nodes_holding_lanes']) or 'none seen'})"
            for r in phase["rounds"]
        )
        lines.append(
            f"{label}: {phase['rows_per_second']:,.0f} rows/s stored into PostgreSQL "
            f"(rounds: {per_round}; "
            f"{phase['rows_stored']:,} rows in {phase['seconds']:.2f} s from the first commit; "
            f"backlog >= {phase['backlog_frames']:,} frames, {phase['backlog_at_first_commit']:,} at the first commit; "
            f"incoming {phase['incoming_messages_per_second']:,.0f} msg/s meanwhile "
            f"({phase['pile_incoming_messages_per_second']:,.0f} while it built up); "
            f"caught up {phase['seconds_from_consume']:.1f} s after add_consumer; CPU in cores: "
            f"{phase['stack_cpu_cores']:.2f} this stack, {phase['other_programs_cpu_cores']:.2f} other programs, "
            f"per round the default nodes' {node_cpu})"
        )
    ratio = figures["ratio"]
    rounds = ", ".join(f"{r:.2f}" if r else "-" for r in figures["round_ratios"])
    lines.append(f"two / one: {ratio:.2f} (rounds: {rounds})" if ratio else "two / one: -")
    ids = figures["ids"]
    lines.append(
        f"ids: {ids['ids_sent']:,} sent over {ids['streams_checked']:,} streams, {ids['rows_stored']:,} rows: "
        f"{ids['missing']} missing, {ids['extra']} extra, {ids['duplicates']} twice"
    )
    lines.append(
        f"nodes answering ping with two default nodes: {', '.join(figures['two_drains']['nodes_answering_ping'])}"
    )
    lines.append(f"{figures['seconds']:.0f} s in all")
    return "\n".join(lines)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short backlogs (under a minute in all)")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="binance-recorder-scaleout-") as workdir:
        figures = measure_scaleout(Path(workdir), quick=args.quick)
    figures["size"] = asdict(QUICK_SCALEOUT if args.quick else FULL_SCALEOUT)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    print(scaleout_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
