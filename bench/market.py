"""The whole market: every symbol of a market-load fake exchange, four stream kinds, a
skewed rate per symbol, recorded by the deployed stack.

What runs (LocalStack, each a process of its own, as in bench/service.py): a
redis-server, the fake exchange in market-load mode (`--market-load-rate`: N symbols,
trade, aggTrade, bookTicker and depth@100ms at R messages per second, Zipf-skewed by
symbol rank; fake_binance/listing.py says why), a `streams` worker with one process per
group, the default worker (the drain) and beat. The symbols are subscribed by name with
the ordinary `subscribe` task, which cuts their streams into groups of at most 1,024
(256 symbols of four streams each, one connection per group). The store is a SQLite
file. The periodic backfill is off, so that nothing lost is repaired from REST behind
the benchmark's back.

Reported, over a window of `seconds` after a warm-up:
- latency per kind: the time a reader of the database first sees a row minus the
  event time the fake stamped (bookTicker carries no event time: there, from the
  subscription task's receipt), p50 and p99;
- ids missing or stored twice, trades and aggTrades, against the fake's ledger (every
  id it wrote, per symbol); the flow is paused and the recorder left to catch up
  before unsubscribing, so that frames in flight at the end are not counted as lost;
- book continuity breaks: rows of the `gaps` table of kind depth;
- CPU per component (the streams processes, the drain's worker, Redis, beat, the fake,
  and this benchmark's own process, which polls the database) in cores, and the
  resident size of each process at the start and end of the window;
- bytes stored per hour per table (SQLite's dbstat: the table's and its indexes' pages)
  and rows per hour.
Then, with `find_max`, the highest rate the stack sustains for `step_seconds` without a
growing backlog, in steps of `step` messages per second (see `_sustains`).

    .venv/bin/python -m bench --parts market            # 10 minutes at 40,000 msg/s, then the search
    .venv/bin/python -m bench --parts market --quick    # seconds: what tests/test_bench.py runs
"""

from __future__ import annotations

import math
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from bench.figures import histogram_summary
from bench.frames import MARKET_MODEL_TRADES_PER_SECOND
from bench.procs import children, cpu_seconds, service_env
from bench.service import NO_BACKFILL_SECONDS, Service, compare_with_sent, settle, start_stack
from bench.watch import POLL_SECONDS, TIME_COLUMNS, MemoryTrack, RowWatcher, drain_processes, stream_processes
from fake_binance.listing import KINDS, LoadPlan, market_symbols
from worker.ops.status import group_statuses
from worker.streams import KIND_TABLES, stream_kind

STREAMS_PER_GROUP = 1024
SYMBOLS_PER_GROUP = STREAMS_PER_GROUP // len(KINDS)
CONNECT_TIMEOUT_SECONDS = 120.0
CATCH_UP_TIMEOUT_SECONDS = 120.0
SAMPLE_SECONDS = 1.0
PAUSE_SECONDS = 3600.0
TABLES = {kind: KIND_TABLES[stream_kind(f"x@{kind}")] for kind in KINDS}
"""Where each kind's rows go: trades, agg_trades, book_tickers, depth_updates."""
GROWTH_TOLERANCE_SECONDS = 1.0
"""A step sustains its rate unless the backlog grows by more than this much traffic."""
FRAME_BYTES_LOWER_BOUND = 100
"""Fewer bytes than any frame of the load: the fake's unsent bytes / this >= frames."""


@dataclass(frozen=True)
class MarketSize:
    symbols: int
    rate: float
    """Messages per second of the measured window."""
    seconds: float
    warmup_seconds: float
    step: float
    """The search's rate step (messages per second) and each step's length."""
    step_seconds: float
    max_steps: int


FULL_MARKET = MarketSize(
    symbols=1500, rate=40_000, seconds=600, warmup_seconds=30, step=10_000, step_seconds=120, max_steps=10
)
QUICK_MARKET = MarketSize(symbols=300, rate=2_000, seconds=4, warmup_seconds=2, step=1_000, step_seconds=4, max_steps=2)


class Components:
    """The stack's processes by role, for CPU and memory (found once the groups record)."""

    def __init__(self, service: Service) -> None:
        streams_worker = service.pid("worker-streams")
        self.pids: dict[str, list[int]] = {
            "streams processes": [streams_worker, *stream_processes(streams_worker, service.exchange_port)],
            "drain (default worker)": [service.pid("worker"), *children(service.pid("worker"))],
            "redis": [service.pid("redis")],
            "beat": [service.pid("beat")],
            "fake exchange": [service.pid("fake-exchange")],
            "benchmark (the watcher)": [os.getpid()],
        }
        self.tracks = [
            MemoryTrack("streams process", stream_processes(streams_worker, service.exchange_port)),
            MemoryTrack("drain process", drain_processes(service.pid("worker"), service.holds_database)),
            MemoryTrack("redis-server", self.pids["redis"]),
            MemoryTrack("beat process", self.pids["beat"]),
            MemoryTrack("fake exchange process", self.pids["fake exchange"]),
        ]
        self.started = time.monotonic()
        self.cpu = {role: cpu_seconds(pids) for role, pids in self.pids.items()}

    def sample_memory(self) -> None:
        for track in self.tracks:
            track.sample()

    def cpu_cores(self) -> dict[str, float]:
        seconds = time.monotonic() - self.started
        return {role: (cpu_seconds(pids) - self.cpu[role]) / seconds for role, pids in self.pids.items()}


class Market(Service):
    """The running stack with a market-load fake, seen from outside."""

    def set_load_rate(self, messages_per_second: float) -> None:
        body = {"action": "set_load_rate", "messages_per_second": messages_per_second}
        requests.post(f"{self.rest_url}/fake/control", json=body, timeout=10).raise_for_status()

    def pause(self, seconds: float) -> None:
        body = {"action": "pause_data", "seconds": seconds}
        requests.post(f"{self.rest_url}/fake/control", json=body, timeout=10).raise_for_status()

    def unsent_bytes(self) -> int:
        """Bytes the fake has written but the recorder's sockets have not taken yet."""
        return sum(c.get("unsent_bytes", 0) for c in self.fake_stats()["open_connections"])

    def data_sent(self) -> int:
        """Data messages the fake has written, all streams."""
        return sum(tally["count"] for kinds in self.fake_stats()["sent"].values() for tally in kinds.values())

    def received(self) -> int:
        return sum(group["messages"] for group in group_statuses(self.redis, self.keys))

    def backlog_frames(self) -> float:
        """Frames waiting: in Redis for the drain, and (at least) in the fake's buffers."""
        return self.backlog() + self.unsent_bytes() / FRAME_BYTES_LOWER_BOUND

    def depth_breaks(self) -> int:
        with sqlite3.connect(f"file:{self.database_path}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM gaps WHERE kind = 'depth'").fetchone()[0])

    @property
    def database_path(self) -> Path:
        return Path(self.database_url.removeprefix("sqlite:///"))


def measure_market(workdir: Path, size: MarketSize, drain_interval: float, find_max: bool) -> dict[str, Any]:
    """Start the stack under `workdir`, record the market, stop everything; the figures."""
    symbols = list(market_symbols(size.symbols))
    groups = math.ceil(len(symbols) / SYMBOLS_PER_GROUP)
    env = service_env(drain_interval_seconds=drain_interval, backfill_interval_seconds=NO_BACKFILL_SECONDS)
    fake_args = [
        *("--market-load-rate", str(size.rate), "--market-load-symbols", str(size.symbols)),
        *("--trades-per-second", str(MARKET_MODEL_TRADES_PER_SECOND)),
    ]
    directory = workdir / "market"
    with start_stack(directory, env, stream_processes=groups, fake_args=fake_args) as stack:
        market = Market(stack)
        _progress(f"market: subscribing {len(symbols):,} symbols x {', '.join(KINDS)} ({groups} groups)")
        subscribed = market.call("tasks.subscribe", symbols, streams=list(KINDS))
        watcher = _recording(market, len(subscribed["groups"]))
        _progress(f"market: warm-up {size.warmup_seconds:g} s, then {size.seconds:g} s at {size.rate:,.0f} msg/s")
        _watch(market, watcher, size.warmup_seconds, [])
        window = _window(market, watcher, size.seconds)
        search = _find_max(market, size) if find_max else None
        market.pause(PAUSE_SECONDS)
        _catch_up(market)
        watcher.close()
        market.call("tasks.unsubscribe", symbols)
        settle(market)
        ids = compare_with_sent(market)
        breaks = market.depth_breaks()
        streams_per_group = market.group_sizes(subscribed["groups"]) or [len(subscribed["streams"])]
    plan = LoadPlan.build(size.symbols, size.rate)
    return {
        "symbols": len(symbols),
        "streams": len(subscribed["streams"]),
        "groups": len(subscribed["groups"]),
        "streams_per_group_at_end": streams_per_group,
        "kinds": list(KINDS),
        "zipf_exponent": plan.exponent,
        "top_10_share": plan.top_share(min(10, size.symbols)),
        "model_trades_per_second": MARKET_MODEL_TRADES_PER_SECOND,
        "drain_interval_seconds": drain_interval,
        "database": "sqlite",
        "size": asdict(size),
        **window,
        "ids": ids,
        "book_continuity_breaks": breaks,
        "find_max": search,
    }


def _recording(market: Market, groups: int) -> RowWatcher:
    """Wait until every group is connected and each kind has stored rows; a watcher of
    the four tables from then on."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
    while True:
        connected = [g for g in group_statuses(market.redis, market.keys) if g["state"] == "connected"]
        if len(connected) == groups and all(_has_rows(market.database_path, table) for table in TABLES.values()):
            return RowWatcher(market.database_path, list(TABLES.values()), receive_lags=False)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"market: {len(connected)} of {groups} groups connected, or some kind stored nothing, "
                f"after {CONNECT_TIMEOUT_SECONDS:.0f} s"
            )
        time.sleep(0.2)


def _has_rows(db: Path, table: str) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
    except sqlite3.OperationalError:  # no file or no table yet: the first drain makes them
        return False


def _watch(
    market: Market, watcher: RowWatcher, seconds: float, samples: list[tuple[float, float]], components: Any = None
) -> dict[str, Counter[int]]:
    """Poll the database for `seconds`: latency histograms per table; every second a
    backlog sample (time, frames) into `samples` and, with `components`, a memory one."""
    histograms: dict[str, Counter[int]] = {table: Counter() for table in TABLES.values()}
    started = time.monotonic()
    next_sample = started
    while (now := time.monotonic()) < started + seconds:
        for table, latencies in watcher.new_latencies_by_table().items():
            histograms[table].update(latencies)
        if now >= next_sample:
            samples.append((now - started, market.backlog_frames()))
            if components is not None:
                components.sample_memory()
            next_sample = now + SAMPLE_SECONDS
        time.sleep(max(0.0, now + POLL_SECONDS - time.monotonic()))
    return histograms


def _window(market: Market, watcher: RowWatcher, seconds: float) -> dict[str, Any]:
    """The measured window: latency, CPU, memory, storage, offered rate."""
    components = Components(market)
    components.sample_memory()
    storage_before = _storage(market.database_path)
    sent_before, started = market.data_sent(), time.monotonic()
    samples: list[tuple[float, float]] = []
    histograms = _watch(market, watcher, seconds, samples, components)
    elapsed = time.monotonic() - started
    offered = (market.data_sent() - sent_before) / elapsed
    cpu = components.cpu_cores()
    components.sample_memory()
    storage = _storage_rates(storage_before, _storage(market.database_path), elapsed)
    return {
        "seconds": elapsed,
        "offered_messages_per_second": offered,
        "latency": {kind: _latency(kind, histograms[table]) for kind, table in TABLES.items()},
        "cpu_cores": cpu,
        "memory": [track.as_dict() for track in components.tracks],
        "storage": storage,
        "backlog_frames": {"first": samples[0][1] if samples else 0, "last": samples[-1][1] if samples else 0},
    }


def _latency(kind: str, histogram: Counter[int]) -> dict[str, Any]:
    start = "receive" if TABLES[kind] in TIME_COLUMNS else "event"
    return {**histogram_summary(histogram), "from": start}


def _storage(db: Path) -> dict[str, tuple[int, int]]:
    """(bytes, rows) per data table: its pages and its indexes' (SQLite's dbstat), and
    its largest rowid (rows are only appended during a run)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        owners = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        sizes: Counter[str] = Counter()
        for name, pages in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            sizes[owners.get(name, name)] += int(pages)
        tables = sorted(set(TABLES.values()) | {"depth_snapshots"})
        return {
            table: (sizes[table], int(conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {table}").fetchone()[0]))
            for table in tables
            if table in owners
        }


def _storage_rates(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], seconds: float
) -> dict[str, dict[str, float]]:
    per_hour = 3600.0 / seconds
    rates = {}
    for table, (size, rows) in after.items():
        size_before, rows_before = before.get(table, (0, 0))
        added_bytes, added_rows = size - size_before, rows - rows_before
        rates[table] = {
            "bytes_per_hour": added_bytes * per_hour,
            "rows_per_hour": added_rows * per_hour,
            "bytes_per_row": added_bytes / added_rows if added_rows else 0.0,
        }
    return rates


def _find_max(market: Market, size: MarketSize) -> dict[str, Any]:
    """Step the rate up from `size.step` until a step's backlog grows; the highest that
    did not, with every step's figures."""
    steps = []
    highest = 0.0
    for number in range(1, size.max_steps + 1):
        rate = size.step * number
        _progress(f"market: find-max step {number}: {rate:,.0f} msg/s for {size.step_seconds:g} s")
        market.set_load_rate(rate)
        step = _step(market, rate, size.step_seconds)
        steps.append(step)
        if not step["sustained"]:
            break
        highest = rate
    return {"step_seconds": size.step_seconds, "steps": steps, "highest_sustained_messages_per_second": highest}


def _step(market: Market, rate: float, seconds: float) -> dict[str, Any]:
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    while time.monotonic() < started + seconds:
        samples.append((time.monotonic() - started, market.backlog_frames()))
        time.sleep(SAMPLE_SECONDS)
    return {"rate": rate, **_sustains(samples, rate)}


def _sustains(samples: Sequence[tuple[float, float]], rate: float) -> dict[str, Any]:
    """Whether the backlog stayed flat: the mean of the last quarter's samples is no more
    than GROWTH_TOLERANCE_SECONDS of traffic above the first quarter's. A drain that
    keeps up leaves a backlog that rises and falls with its interval; one that does not
    falls further behind every second."""
    quarter = max(1, len(samples) // 4)
    first = sum(frames for _, frames in samples[:quarter]) / quarter
    last = sum(frames for _, frames in samples[-quarter:]) / quarter
    return {
        "backlog_first_quarter_frames": first,
        "backlog_last_quarter_frames": last,
        "sustained": last - first <= GROWTH_TOLERANCE_SECONDS * rate,
    }


def _catch_up(market: Market) -> None:
    """With the fake paused: wait until everything it wrote was received and drained."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_SECONDS
    previous = -1
    while True:
        received = market.received()
        if not market.unsent_bytes() and received == previous and not market.backlog():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"market: the recorder did not catch up within {CATCH_UP_TIMEOUT_SECONDS:.0f} s")
        previous = received
        time.sleep(SAMPLE_SECONDS)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
