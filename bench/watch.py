"""Watching the running service from outside: new rows in SQLite, and resident memory.

Latency is taken where a user would see it: a row counts as stored when a reader of
the SQLite file first sees it. Polling every POLL_SECONDS, the time of the poll that
first returns a row is an upper bound of its commit time (by at most one poll plus the
query). The row's `event_time` is the `E` the fake exchange stamped when it emitted
the event; both clocks are this machine's, so their difference is the latency. The
row's `received_at` (its flush's clock mark) splits it: event to receive is the fake
and the subscription task, receive to visible is the buffer and the drain.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import children, holds_connection_to, holds_file_open, rss_kb
from worker.times import now_ms

POLL_SECONDS = 0.01
TABLES = ("trades", "agg_trades")


class RowWatcher:
    """Rows added to the trade tables since the last look, as latencies in ms.

    Rowid order is insertion order (the tables keep their rowid and nothing deletes
    during a run), so `rowid > last seen` is exactly the new rows.
    """

    def __init__(self, db: Path) -> None:
        # Autocommit: every SELECT is its own read transaction and sees the last commit.
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        self.receive_lags: list[int] = []  # received_at - event_time of the rows seen
        try:
            self.last_rowid = {table: self._max_rowid(table) for table in TABLES}
        except sqlite3.OperationalError:
            self.conn.close()
            raise

    def _max_rowid(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {table}").fetchone()[0])

    def new_latencies(self) -> list[int]:
        latencies: list[int] = []
        for table in TABLES:
            rows = self.conn.execute(
                f"SELECT rowid, event_time, received_at FROM {table} WHERE rowid > ? ORDER BY rowid",
                (self.last_rowid[table],),
            ).fetchall()
            seen = now_ms()
            if rows:
                self.last_rowid[table] = rows[-1][0]
                latencies.extend(seen - event_time for _, event_time, _ in rows)
                self.receive_lags.extend(received - event_time for _, event_time, received in rows)
        return latencies

    def close(self) -> None:
        self.conn.close()


@dataclass
class MemoryTrack:
    """Resident size of some processes from a start sample to an end sample."""

    role: str
    pids: list[int]
    start_kb: dict[int, int] = field(default_factory=dict)
    end_kb: dict[int, int] = field(default_factory=dict)
    max_kb: dict[int, int] = field(default_factory=dict)

    def sample(self) -> None:
        for pid in self.pids:
            rss = rss_kb(pid)
            if rss is None:
                continue
            self.start_kb.setdefault(pid, rss)
            self.end_kb[pid] = rss
            self.max_kb[pid] = max(rss, self.max_kb.get(pid, 0))

    def as_dict(self) -> dict[str, object]:
        processes = [
            {
                "pid": pid,
                "start_kb": self.start_kb[pid],
                "end_kb": self.end_kb[pid],
                "max_kb": self.max_kb[pid],
                "growth": self.end_kb[pid] / self.start_kb[pid] - 1,
            }
            for pid in self.pids
            if pid in self.start_kb
        ]
        return {
            "role": self.role,
            "processes": processes,
            "max_growth": max((p["growth"] for p in processes), default=None),
        }


def stream_processes(streams_worker_pid: int, exchange_port: int) -> list[int]:
    """The streams worker's pool children that hold a websocket to the exchange."""
    return [pid for pid in children(streams_worker_pid) if holds_connection_to(pid, exchange_port)]


def drain_processes(default_worker_pid: int, db: Path) -> list[int]:
    """The default worker's pool children that have run a drain (they keep the SQLite
    file open); all of its children if none has yet."""
    pool = children(default_worker_pid)
    return [pid for pid in pool if holds_file_open(pid, db)] or pool


def poll_until(deadline: float, watcher: RowWatcher, tracks: list[MemoryTrack], sample_every: float) -> list[int]:
    """Collect latencies until `deadline` (monotonic), sampling memory as it goes."""
    latencies: list[int] = []
    next_sample = time.monotonic()
    while (now := time.monotonic()) < deadline:
        latencies.extend(watcher.new_latencies())
        if now >= next_sample:
            for track in tracks:
                track.sample()
            next_sample = now + sample_every
        time.sleep(max(0.0, now + POLL_SECONDS - time.monotonic()))
    return latencies
