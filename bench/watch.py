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
TIME_COLUMNS = {"book_tickers": "received_at"}
"""Tables whose rows carry no event time (spot's bookTicker has none): there a row's
latency starts when the subscription task received it."""
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

    def __init__(self, db: Path, tables: Sequence[str] = TABLES, receive_lags: bool = True) -> None:
        # Autocommit: every SELECT is its own read transaction and sees the last commit.
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        self.receive_lags: list[int] = []  # received_at - event_time of the rows seen
        self.tables = tuple(tables)
        self.keep_receive_lags = receive_lags  # off for long runs: a list entry per row
        try:
            self.last_rowid = {table: self._max_rowid(table) for table in self.tables}
        except sqlite3.OperationalError:
            self.conn.close()
            raise

    def _max_rowid(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {table}").fetchone()[0])

    def new_latencies(self) -> list[int]:
        return [latency for table in self.new_latencies_by_table().values() for latency in table]

    def new_latencies_by_table(self) -> dict[str, list[int]]:
        """Each watched table's new rows, as latencies in ms (see TIME_COLUMNS).

        The tables are read in one read transaction, whose snapshot is taken by its first
        SELECT: every row it shows was committed before the first table's rows were
        read, and that moment is each row's `seen`. Reading each table in a transaction
        of its own, stamped after its own read, charged the later tables with the time
        it took to read the earlier ones: depth diffs, read last and committed with the
        trades of the same drain round, measured 21 ms later at p50 than those trades
        in the 10-minute market run (docs/performance.md)."""
        latencies: dict[str, list[int]] = {}
        seen: int | None = None
        self.conn.execute("BEGIN")
        try:
            for table in self.tables:
                time_column = TIME_COLUMNS.get(table, "event_time")
                rows = self.conn.execute(
                    f"SELECT rowid, {time_column}, received_at FROM {table} WHERE rowid > ? ORDER BY rowid",
                    (self.last_rowid[table],),
                ).fetchall()
                seen = now_ms() if seen is None else seen
                latencies[table] = [seen - event_time for _, event_time, _ in rows]
                if rows:
                    self.last_rowid[table] = rows[-1][0]
                if rows and self.keep_receive_lags:
                    self.receive_lags.extend(received - event_time for _, event_time, received in rows)
        finally:
            self.conn.execute("COMMIT")
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
        # The polls read a few rows through an index, always. Without statistics (a new
        # table autovacuum has not analyzed yet), or with a generic plan (psycopg
        # prepares a query after a few runs), the planner guesses that `trade_time >= $n`
        # is a third of the table and reads all of it; so: plans for this poll's values,
        # no sequential scans, and no JIT (thousands of symbols look expensive enough to
        # compile the query, which takes longer than running it). This session only.
        for setting in ("plan_cache_mode = force_custom_plan", "enable_seqscan = off", "jit = off"):
            self.conn.execute(f"SET {setting}")
        self.symbols = list(symbols)
        self.receive_lags: list[int] = []
        try:
            self.last = {table: self._last_rows(table) for table in TABLES}
        except psycopg.errors.UndefinedTable as error:
            self.conn.close()
            raise NotReady(str(error)) from error

    def _last_rows(self, table: str) -> list[tuple[int, int | None]]:
        """(id, trade_time) of each symbol's last stored row; (-1, None) for none yet."""
        column = ID_COLUMNS[table]
        rows = self.conn.execute(
            f"SELECT coalesce(t.{column}, -1), t.trade_time "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS w(symbol, n) "
            f"LEFT JOIN LATERAL (SELECT {column}, trade_time FROM {table} "
            f"WHERE symbol = w.symbol ORDER BY {column} DESC LIMIT 1) t ON true ORDER BY w.n",
            (self.symbols,),
        ).fetchall()
        return [(int(row_id), trade_time) for row_id, trade_time in rows]

    def new_latencies(self) -> list[int]:
        latencies: list[int] = []
        for table in TABLES:
            last = self.last[table]
            seen = [i for i, (_, trade_time) in enumerate(last) if trade_time is not None]
            unseen = [i for i, (_, trade_time) in enumerate(last) if trade_time is None]
            rows: list[Any] = []
            if seen:
                rows += self._query(table, _after_time_sql(table), seen, min(last[i][1] or 0 for i in seen))
            if unseen:
                rows += self._query(table, _probe_sql(table), unseen)
            now = now_ms()
            for i, row_id, event_time, received_at, trade_time in rows:
                if row_id > last[i][0]:
                    last[i] = (row_id, trade_time)
                latencies.append(now - event_time)
                self.receive_lags.append(received_at - event_time)
        return latencies

    def _query(self, table: str, sql: str, indexes: list[int], *extra: int) -> list[Any]:
        """`sql` over the symbols at `indexes`: (index, id, event_time, received_at, trade_time)."""
        last = self.last[table]
        # As comma-separated text: psycopg adapts a list element by element, which costs
        # more than the query when there are thousands.
        symbols = ",".join(self.symbols[i] for i in indexes)
        last_ids = ",".join(str(last[i][0]) for i in indexes)
        numbers = ",".join(map(str, indexes))
        return list(self.conn.execute(sql, (symbols, last_ids, numbers, *extra)).fetchall())

    def close(self) -> None:
        self.conn.close()


_WATERMARKS = (
    "unnest(string_to_array(%s, ','), string_to_array(%s, ',')::bigint[], string_to_array(%s, ',')::int[]) "
    "AS w(symbol, last_id, i)"
)
"""Each symbol with the last id seen and its index in the watcher's list."""


def _after_time_sql(table: str) -> str:
    """New rows of symbols already seen. A symbol's trade times grow with its ids, so its
    unseen rows lie after its last seen trade time, and all of them after the smallest:
    one range of the trade-time index, joined to the last ids, instead of one probe per
    symbol."""
    column = ID_COLUMNS[table]
    return (
        f"SELECT w.i, t.{column}, t.event_time, t.received_at, t.trade_time FROM {table} t "
        f"JOIN {_WATERMARKS} "
        f"ON t.symbol = w.symbol AND t.{column} > w.last_id WHERE t.trade_time >= %s"
    )


def _probe_sql(table: str) -> str:
    """New rows of symbols not seen yet: one probe of the primary key per symbol (OFFSET 0
    keeps the subquery from being flattened into a join that reads the whole table)."""
    column = ID_COLUMNS[table]
    return (
        f"SELECT w.i, t.{column}, t.event_time, t.received_at, t.trade_time "
        f"FROM {_WATERMARKS} "
        f"CROSS JOIN LATERAL (SELECT {column}, event_time, received_at, trade_time FROM {table} "
        f"WHERE symbol = w.symbol AND {column} > w.last_id OFFSET 0) t"
    )


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


def poll_until(
    deadline: float, watcher: Watcher, tracks: list[MemoryTrack], sample_every: float, polls: list[int] | None = None
) -> list[int]:
    """Collect latencies until `deadline` (monotonic), sampling memory as it goes;
    appends to `polls` how many polls it made (their mean interval bounds the error)."""
    latencies: list[int] = []
    next_sample = time.monotonic()
    count = 0
    while (now := time.monotonic()) < deadline:
        latencies.extend(watcher.new_latencies())
        count += 1
        if now >= next_sample:
            for track in tracks:
                track.sample()
            next_sample = now + sample_every
        time.sleep(max(0.0, now + POLL_SECONDS - time.monotonic()))
    if polls is not None:
        polls.append(count)
    return latencies
