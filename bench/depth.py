"""Part 7, order books: diff depth at 2,000 events/s, its storage, and rebuilding a book,
for spot (`depth`) and for USDⓈ-M futures (`depth_usdm`), the same measures on each.

- drain capacity: the real Drainer (parse, store, continuity check per symbol) on a
  backlog of depth@100ms frames of 200 interleaved symbols in a real redis-server;
- sustained: 200 symbols x depth@100ms = 2,000 events/s pushed into Redis as a
  subscription task does (a flush with its clock mark every 50 ms, event time = push
  time, each flush ringing the drain's doorbell) while the Drainer stores them as they
  arrive, as a tasks.drain run does (`drain_window`); latency = when a reader
  of the SQLite file first sees a row (polled every 10 ms) - its event time;
- storage: bytes per symbol-hour of `depth_updates` (table and indexes, SQLite's
  dbstat), against the same rows with the levels kept as Binance's JSON text;
- rebuild: `book_at` at the end of one hour of depth@100ms (36,000 events on a
  1,000-level snapshot), and the levels' decoding alone, packed against JSON.

Events change LEVELS_PER_EVENT levels (half bids, half asks; one in five removed),
about what a liquid symbol's depth@100ms event carries; the generator is seeded.
A futures event is what USDⓈ-M sends: it also carries `pu` (the previous event's `u`,
which continuity follows: its update ids jump between events, as Binance's do) and `T`,
goes to a USDⓈ-M group and so to `usdm_depth_updates`, and the book is rebuilt from
`usdm_depth_snapshots` by `pu` (`book_at(..., market="usdm")`).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
from sqlalchemy import func, select

from bench.figures import latency_summary
from bench.procs import service_env
from worker.buffer import FrameBuffer, clock_mark, ring_doorbell
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.book import book_at
from worker.ops.local_stack import LocalStack
from worker.store.depth import pack_levels, snapshot_row, unpack_levels
from worker.store.drain import Drainer
from worker.store.storage import NOT_RECEIVED, create_schema, gaps, make_engine, store_rows
from worker.streams import SPOT, USDM, market_named
from worker.times import now_ms

SYMBOLS = 200
EVENTS_PER_SECOND_PER_SYMBOL = 10  # depth@100ms
LEVELS_PER_EVENT = 20
SNAPSHOT_LEVELS = 1000
FLUSH_MS = 50
POLL_SECONDS = 0.01
HOUR_EVENTS = 3600 * EVENTS_PER_SECOND_PER_SYMBOL
KEYS = RedisKeys("bench")
DEPTH_PARTS = {"depth": SPOT, "depth_usdm": USDM}
"""The bench's depth parts and the market each measures: the same figures side by side."""


@dataclass(frozen=True)
class DepthSizes:
    backlog_seconds: int  # of 2,000 events/s, drained as a backlog
    sustained_seconds: float
    rebuild_events: int


QUICK_DEPTH = DepthSizes(backlog_seconds=2, sustained_seconds=3, rebuild_events=3_600)
FULL_DEPTH = DepthSizes(backlog_seconds=15, sustained_seconds=60, rebuild_events=HOUR_EVENTS)


class DepthFeed:
    """Chained depth@100ms events of many symbols of `market`, around a price of 100."""

    def __init__(self, symbols: list[str], seed: int = 7, market: str = SPOT) -> None:
        self.symbols = symbols
        self.rng = random.Random(seed)
        self.next_id = dict.fromkeys(symbols, 1)
        self.futures = market_named(market).futures

    def levels(self, side: str) -> list[list[str]]:
        base = 100.0 if side == "a" else 99.99
        sign = 1 if side == "a" else -1
        chosen = []
        for _ in range(LEVELS_PER_EVENT // 2):
            price = base + sign * self.rng.randrange(SNAPSHOT_LEVELS) * 0.01
            qty = 0.0 if self.rng.random() < 0.2 else self.rng.randrange(1, 10**6) / 1000
            chosen.append([f"{price:.8f}", f"{qty:.8f}"])
        return chosen

    def event(self, symbol: str, event_time: int) -> dict[str, Any]:
        previous = self.next_id[symbol] - 1
        # A futures book's ids are the engine's, shared by every symbol: they jump
        # between its events, and `pu` says which event came before.
        first = previous + 1 + (self.rng.randrange(50) if self.futures else 0)
        final = first + self.rng.randrange(1, 6)  # one event covers several update ids
        self.next_id[symbol] = final + 1
        event = {"e": "depthUpdate", "E": event_time, "s": symbol, "U": first, "u": final,
                 "b": self.levels("b"), "a": self.levels("a")}  # fmt: skip
        return {**event, "T": event_time, "pu": previous} if self.futures else event

    def row(self, event: dict[str, Any]) -> tuple[Any, ...]:
        """The event as its market's depth_updates row (futures add `pu` and `T`)."""
        levels = (pack_levels(event["b"]), pack_levels(event["a"]))
        futures = (event["pu"], event["T"]) if self.futures else ()
        return (event["s"], event["u"], event["U"], event["E"], *levels, *futures, *NOT_RECEIVED)

    def frames(self, event_time: int) -> list[bytes]:
        """One 100 ms tick: an event of every symbol, as combined-stream frames."""
        return [
            orjson.dumps({"stream": f"{s.lower()}@depth@100ms", "data": self.event(s, event_time)})
            for s in self.symbols
        ]

    def snapshot(self, symbol: str, last_update_id: int) -> tuple[Any, ...]:
        bids = [[f"{99.99 - i * 0.01:.8f}", "1.00000000"] for i in range(SNAPSHOT_LEVELS)]
        asks = [[f"{100 + i * 0.01:.8f}", "1.00000000"] for i in range(SNAPSHOT_LEVELS)]
        return snapshot_row(symbol, {"lastUpdateId": last_update_id, "bids": bids, "asks": asks}, 0)


@dataclass(frozen=True)
class Book:
    """Which market's books a run measures: its group and tables."""

    market: str

    @property
    def group(self) -> Group:
        return Group(f"bench-depth-{self.market}", ("btcusdt@depth@100ms",), self.market)

    @property
    def updates(self) -> str:
        return market_named(self.market).table("depth")

    @property
    def snapshots(self) -> str:
        return market_named(self.market).table_prefix + "depth_snapshots"

    def feed(self, symbols: list[str]) -> DepthFeed:
        return DepthFeed(symbols, market=self.market)


def measure_depth(workdir: Path, sizes: DepthSizes, batch_size: int, market: str = SPOT) -> dict[str, Any]:
    """The part's figures for `market`'s books (spot's `depth`, or `usdm` for `depth_usdm`)."""
    book = Book(market)
    directory = workdir / f"depth-{market}"
    symbols = [f"SYM{i:04d}USDT" for i in range(1, SYMBOLS + 1)]
    with LocalStack(directory, env=service_env()) as stack:
        client = redis.Redis.from_url(stack.start_redis())
        capacity = _drain_capacity(client, directory / "capacity.db", book, symbols, sizes, batch_size)
        sustained = _sustained(client, directory / "sustained.db", book, symbols, sizes, batch_size)
    return {
        "market": market,
        "table": book.updates,
        "symbols": SYMBOLS,
        "levels_per_event": LEVELS_PER_EVENT,
        "drain_capacity": capacity,
        "sustained": sustained,
        "storage": _storage(directory / "sustained.db", directory / "json.db", book.updates),
        "rebuild": _rebuild(directory / "rebuild.db", book, sizes.rebuild_events),
    }


def _prepared(client: redis.Redis, db: Path, book: Book, symbols: list[str], batch_size: int) -> tuple[Drainer, str]:
    """A fresh database whose books start on a snapshot at id 0, and a registered list."""
    client.flushdb()
    GroupRegistry(client, KEYS).want(book.group)
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    feed = book.feed(symbols)
    with engine.begin() as conn:
        store_rows(conn, {book.snapshots: [feed.snapshot(s, 0) for s in symbols]})
    return Drainer(client, KEYS, engine, batch_size), FrameBuffer(client, KEYS).register(book.group.id, book.market)


def _drain_capacity(
    client: redis.Redis, db: Path, book: Book, symbols: list[str], sizes: DepthSizes, batch_size: int
) -> dict[str, Any]:
    drainer, key = _prepared(client, db, book, symbols, batch_size)
    feed = book.feed(symbols)
    ticks = sizes.backlog_seconds * EVENTS_PER_SECOND_PER_SYMBOL
    for tick in range(ticks):
        event_time = 1_700_000_000_000 + tick * 100
        client.rpush(key, clock_mark(event_time), *feed.frames(event_time))
    started = time.perf_counter()
    report = drainer.drain(time_budget=600)
    seconds = time.perf_counter() - started
    rows = report.rows[book.updates]
    if rows != ticks * len(symbols) or client.llen(key):
        raise RuntimeError(f"the drainer stored {dict(report.rows)}, expected {ticks * len(symbols)} {book.updates}")
    with drainer.engine.connect() as conn:
        breaks = conn.execute(select(func.count()).select_from(gaps)).scalar_one()
    if breaks:  # every event continues the one before (`U`, or `pu` on futures)
        raise RuntimeError(f"the drainer found {breaks} breaks in chained {book.market} depth events")
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds, "batch_size": batch_size}


def _sustained(
    client: redis.Redis, db: Path, book: Book, symbols: list[str], sizes: DepthSizes, batch_size: int
) -> dict[str, Any]:
    drainer, key = _prepared(client, db, book, symbols, batch_size)
    feed = book.feed(symbols)
    # Built before the clock starts, with the event time filled in when pushed, so that
    # making the frames does not compete with the drain for the interpreter.
    ticks = [feed.frames(0) for _ in range(int(sizes.sustained_seconds * EVENTS_PER_SECOND_PER_SYMBOL))]
    stop = threading.Event()
    pushed: dict[str, float] = {}
    producer = threading.Thread(target=_produce, args=(client, key, ticks, pushed), daemon=True)
    latencies: list[int] = []
    watcher = threading.Thread(target=_watch, args=(db, book.updates, stop, latencies), daemon=True)
    watcher.start()
    producer.start()
    # As tasks.drain runs it: a window that stores what arrives, woken by each flush.
    drainer.drain_window(keep_going=producer.is_alive)
    drainer.drain(time_budget=60)
    time.sleep(0.1)
    stop.set()
    watcher.join()
    return {
        "seconds": sizes.sustained_seconds,
        "offered_events_per_second": pushed["events"] / pushed["seconds"],
        "latency": latency_summary(latencies),
    }


def _produce(client: redis.Redis, key: str, ticks: list[list[bytes]], pushed: dict[str, float]) -> None:
    """Every 100 ms one event per symbol, flushed in two halves 50 ms apart, like FrameWriter."""
    started = next_at = time.monotonic()
    events = 0
    for frames in ticks:
        now = now_ms()
        # The event time, and a futures event's transaction time, stamped when pushed.
        frames = [
            frame.replace(b'"E":0,', b'"E":%d,' % now, 1).replace(b'"T":0,', b'"T":%d,' % now, 1) for frame in frames
        ]
        half = len(frames) // 2
        for part in (frames[:half], frames[half:]):
            with client.pipeline(transaction=False) as pipe:
                pipe.rpush(key, clock_mark(now_ms()), *part)
                ring_doorbell(pipe, KEYS, key)
                pipe.execute()
            events += len(part)
            next_at += FLUSH_MS / 1000
            time.sleep(max(0.0, next_at - time.monotonic()))
    pushed.update(events=events, seconds=time.monotonic() - started)


def _watch(db: Path, table: str, stop: threading.Event, latencies: list[int]) -> None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    last = 0
    while not stop.is_set():
        rows = conn.execute(f"SELECT rowid, event_time FROM {table} WHERE rowid > ? ORDER BY rowid", (last,)).fetchall()
        seen = now_ms()
        if rows:
            last = rows[-1][0]
            latencies.extend(seen - event_time for _, event_time in rows)
        time.sleep(POLL_SECONDS)
    conn.close()


def _table_bytes(conn: sqlite3.Connection, table: str) -> int:
    """The pages of a table and of its indexes (dbstat counts each B-tree by name)."""
    names = [table] + [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = ?", (table,))]
    marks = ",".join("?" * len(names))
    return int(conn.execute(f"SELECT sum(pgsize) FROM dbstat WHERE name IN ({marks})", names).fetchone()[0])


def _storage(packed_db: Path, json_db: Path, table: str) -> dict[str, Any]:
    """Bytes per symbol-hour of the depth table as stored, and with the levels as JSON text."""
    packed = sqlite3.connect(packed_db)
    rows = packed.execute(f"SELECT * FROM {table}").fetchall()
    packed_bytes = _table_bytes(packed, table)
    json_db.unlink(missing_ok=True)
    as_json = sqlite3.connect(json_db)
    # The same table and indexes, with TEXT levels (the 5th and 6th columns in every market).
    for (sql,) in packed.execute("SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL", (table,)):
        as_json.execute(sql.replace("BLOB", "TEXT"))
    as_json.executemany(
        f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})",
        [(*row[:4], _as_json(row[4]), _as_json(row[5]), *row[6:]) for row in rows],
    )
    as_json.commit()
    json_bytes = _table_bytes(as_json, table)
    packed.close()
    as_json.close()
    per_hour = HOUR_EVENTS / len(rows)
    return {
        "rows": len(rows),
        "packed_bytes_per_symbol_hour": packed_bytes * per_hour,
        "json_bytes_per_symbol_hour": json_bytes * per_hour,
        "packed_bytes_per_event": packed_bytes / len(rows),
        "json_bytes_per_event": json_bytes / len(rows),
    }


def _as_json(packed: bytes) -> str:
    """The levels as Binance sends them: [["price", "qty"], ...] with 8 decimals."""
    return orjson.dumps([[f"{p:.8f}", f"{q:.8f}"] for p, q in unpack_levels(packed)]).decode()


def _rebuild(db: Path, book: Book, events: int) -> dict[str, Any]:
    """One symbol: a 1,000-level snapshot, then `events` depth@100ms events."""
    db.unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    feed = book.feed(["BTCUSDT"])
    start = 1_700_000_000_000
    rows, json_levels = [], []
    for n in range(events):
        e = feed.event("BTCUSDT", start + n * 100)
        rows.append(feed.row(e))
        json_levels.append((orjson.dumps(e["b"]), orjson.dumps(e["a"])))
    with engine.begin() as conn:
        store_rows(conn, {book.snapshots: [feed.snapshot("BTCUSDT", 0)], book.updates: rows})
    started = time.perf_counter()
    rebuilt = book_at(engine, "BTCUSDT", start + events * 100, levels=20, market=book.market)
    rebuild_seconds = time.perf_counter() - started
    engine.dispose()
    if rebuilt.update_id != rows[-1][1]:
        raise RuntimeError(f"rebuilt to update {rebuilt.update_id}, expected {rows[-1][1]}")
    started = time.perf_counter()
    for bids, asks in ((row[4], row[5]) for row in rows):
        unpack_levels(bids), unpack_levels(asks)
    packed_decode = time.perf_counter() - started
    started = time.perf_counter()
    for bids, asks in json_levels:
        [(float(p), float(q)) for p, q in orjson.loads(bids)], [(float(p), float(q)) for p, q in orjson.loads(asks)]
    json_decode = time.perf_counter() - started
    return {
        "events": events,
        "replayed_hours": events / HOUR_EVENTS,
        "book_at_seconds": rebuild_seconds,
        "decode_packed_seconds": packed_decode,
        "decode_json_seconds": json_decode,
    }
