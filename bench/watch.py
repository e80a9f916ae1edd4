"""Watching the running service from outside: new rows in its database, and resident memory.

Latency is taken where a user would see it: a row counts as stored when a reader of
the database first sees it. Polling every POLL_SECONDS, the time of the poll that
first returns a row is an upper bound of its commit time (by at most one poll plus the
query). The row's `event_time` is the `E` the fake exchange stamped when it emitted
the event; both clocks are this machine's, so their difference is the latency. The
row's `received_at` (its flush's clock mark) splits it: event to receive is the fake
and the subscription task, receive to visible is the buffer and the drain.

New rows: on SQLite, rowid order is insertion order. PostgreSQL has no such column
(ctid and xmin follow neither commit order nor, across backends, insertion order), so
there the watcher follows each watched symbol's ids instead: a symbol's trade and
aggregate-trade ids grow along its stream, which one subscription task buffers in one
Redis list and the drain stores in order, so `id > the last seen` of the symbol is
exactly its new rows. One index probe per symbol and table per poll (LATERAL over the
primary key), so a poll over thousands of symbols takes longer than POLL_SECONDS.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.engine import make_url

from bench.procs import children, holds_connection_to, rss_kb
from worker.ops.local_postgres import PostgresError, connect
from worker.times import now_ms

POLL_SECONDS = 0.01
TABLES = ("trades", "agg_trades")
ID_COLUMNS = {"trades": "trade_id", "agg_trades": "agg_id"}


class NotReady(Exception):
    """The database or its tables do not exist yet: the first drain (or worker) makes them."""


class Watcher(Protocol):
    receive_lags: list[int]

    def new_latencies(self) -> list[int]: ...

    def close(self) -> None: ...


def open_row_watcher(database_url: str, symbols: Sequence[str]) -> Watcher:
    """A watcher of the service's database (`symbols`: the ones recorded, for PostgreSQL);
    NotReady while there are no tables to watch."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        try:
            return RowWatcher(Path(url.database or ""))
        except sqlite3.OperationalError as error:
            raise NotReady(str(error)) from error
    return PostgresRowWatcher(database_url, symbols)


class RowWatcher:
    """Rows added to the trade tables of a SQLite file since the last look, as latencies in ms.

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


class PostgresRowWatcher:
    """Rows of `symbols` added to the trade tables of a PostgreSQL database since the last
    look, as latencies in ms (see the module's docstring for how)."""

    def __init__(self, database_url: str, symbols: Sequence[str]) -> None:
        import psycopg

        try:
            # Autocommit: every SELECT sees the last commit.
            self.conn = connect(database_url, autocommit=True)
        except PostgresError as error:
            raise NotReady(str(error)) from error
        self.symbols = list(symbols)
        self.receive_lags: list[int] = []
        self.queries = {table: self._new_rows_sql(table) for table in TABLES}
        try:
            self.last_id = {table: self._max_ids(table) for table in TABLES}
        except psycopg.errors.UndefinedTable as error:
            self.conn.close()
            raise NotReady(str(error)) from error

    def _max_ids(self, table: str) -> list[int]:
        column = ID_COLUMNS[table]
        rows = self.conn.execute(
            f"SELECT coalesce((SELECT max({column}) FROM {table} t WHERE t.symbol = w.symbol), -1) "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS w(symbol, n) ORDER BY n",
            (self.symbols,),
        ).fetchall()
        return [int(row[0]) for row in rows]

    @staticmethod
    def _new_rows_sql(table: str) -> str:
        column = ID_COLUMNS[table]
        return (
            f"SELECT w.n, t.{column}, t.event_time, t.received_at "
            "FROM unnest(%s::text[], %s::bigint[]) WITH ORDINALITY AS w(symbol, last_id, n) "
            f"CROSS JOIN LATERAL (SELECT {column}, event_time, received_at FROM {table} "
            f"WHERE symbol = w.symbol AND {column} > w.last_id) t"
        )

    def new_latencies(self) -> list[int]:
        latencies: list[int] = []
        for table in TABLES:
            last = self.last_id[table]
            rows: list[Any] = self.conn.execute(self.queries[table], (self.symbols, last)).fetchall()
            seen = now_ms()
            for n, row_id, event_time, received_at in rows:
                last[n - 1] = max(last[n - 1], row_id)
                latencies.append(seen - event_time)
                self.receive_lags.append(received_at - event_time)
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


def drain_processes(default_worker_pid: int, holds_database: Callable[[int], bool]) -> list[int]:
    """The default worker's pool children that have run a drain (they keep the SQLite
    file, or a connection to PostgreSQL, open); all of its children if none has yet."""
    pool = children(default_worker_pid)
    return [pid for pid in pool if holds_database(pid)] or pool


def poll_until(deadline: float, watcher: Watcher, tracks: list[MemoryTrack], sample_every: float) -> list[int]:
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
