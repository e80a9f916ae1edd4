"""`python -m bench.disk`: bytes per row of every table in SQLite, PostgreSQL and the
day files (Parquet, zstd), at the fake exchange's market mix.

Records the fake exchange (started on 127.0.0.1) for `--seconds`: every spot stream
kind of three symbols on one connection, USDⓈ-M's on its two routes (`/public` books,
`/market` the rest), a few REST depth snapshots per symbol; parses the frames with the
drain's parser and stores the same rows into a fresh SQLite file and, with `--postgres`
(a private cluster) or `--database-url`, a fresh PostgreSQL database. Then:
- SQLite: the pages of each table and of its indexes (`dbstat`, unused space included),
  less those of the empty schema;
- PostgreSQL: `pg_total_relation_size` (heap, indexes, TOAST) summed over the daily
  partitions and the default one, less the empty table's;
- Parquet: the archiver writes the recorded day (`worker.store.dayfiles.archive_days`,
  with "now" two days later so that today counts as closed), and each table's files,
  less an empty file of the same schema per file (the footer every day file pays once).

`--market`: the whole market's mix instead (`bench.frames.market_ticks`: trade, aggTrade,
bookTicker and depth@100ms of 1,500 symbols at 40,000 msg/s, Zipf-skewed, the load
test's frames), `--seconds` of it on a simulated clock, plus a REST depth snapshot of a
few symbols from the fake in market-load mode; and what a day of it costs: rows per
day from the sample's rows per second (depth snapshots: one per book every
DEPTH_SNAPSHOT_INTERVAL_SECONDS), times bytes per row. No Parquet figure there: seconds
of 1,500 symbols make thousands of day files of a few rows each, unlike a day's.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import websocket
from sqlalchemy import Engine, func, select, text

from bench.database import Databases
from bench.frames import MARKET_MODEL_TRADES_PER_SECOND, MARKET_RATE, MARKET_SYMBOLS, market_ticks
from fake_binance.listing import market_symbols
from fake_binance.load import TICK_MS
from worker.buffer import clock_mark
from worker.ops.local_postgres import check_server, start_private_server
from worker.ops.local_stack import LocalStack
from worker.settings import Settings
from worker.store import dayfiles
from worker.store.depth import snapshot_row
from worker.store.parsing import Row, parse_frames
from worker.store.partitions import DAY_MS
from worker.store.storage import TABLES, archived_days, create_schema, make_engine, store_rows
from worker.times import now_ms

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
SPOT_KINDS = (
    "trade", "aggTrade", "kline_1m", "ticker", "ticker_1h", "miniTicker", "bookTicker",
    "avgPrice", "depth@100ms", "depth20@100ms", "blockTrade", "referencePrice",
)  # fmt: skip
USDM_PUBLIC_KINDS = ("depth@100ms", "depth20@100ms", "bookTicker")
USDM_MARKET_KINDS = ("trade", "aggTrade", "kline_1m", "markPrice@1s", "ticker", "miniTicker", "forceOrder")
MARK_EVERY_MS = 50
SNAPSHOTS_PER_SYMBOL = 3
MARKET_SNAPSHOT_SYMBOLS = tuple(
    market_symbols(MARKET_SYMBOLS)[rank] for rank in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 1499)
)
"""Books of the market mix snapshotted over REST: the busiest, a few by rank, the thinnest."""
DAY_SECONDS = 86_400
DEPTH_TABLES = ("depth_updates", "depth_snapshots")
MARKET_FAKE_ARGS = (
    *("--market-load-rate", "1", "--market-load-symbols", str(MARKET_SYMBOLS)),
    *("--trades-per-second", str(MARKET_MODEL_TRADES_PER_SECOND)),
)
"""The fake whose REST snapshots `--market` measures: the load's listing and book model
(its streams are not read: the frames come from `market_ticks`)."""


def record(base_url: str, seconds: float) -> dict[str, list[Row]]:
    """The rows of `seconds` of the fake's streams, per table, as the drain would store them."""
    ws = base_url.replace("http://", "ws://")
    spot = [f"{s.lower()}@{kind}" for s in SYMBOLS for kind in SPOT_KINDS]
    usdm_public = [f"{s.lower()}@{kind}" for s in SYMBOLS[:2] for kind in USDM_PUBLIC_KINDS]
    usdm_market = [f"{s.lower()}@{kind}" for s in SYMBOLS[:2] for kind in USDM_MARKET_KINDS]
    usdm_market.append("btcusdt_perpetual@continuousKline_1m")
    connections = {
        ("spot", f"{ws}/stream?streams={'/'.join(spot)}"),
        ("usdm", f"{ws}/usdm/public/stream?streams={'/'.join(usdm_public)}"),
        ("usdm", f"{ws}/usdm/market/stream?streams={'/'.join(usdm_market)}"),
    }
    received: list[tuple[str, list[bytes]]] = []
    threads = [threading.Thread(target=_receive, args=(url, seconds, market, received)) for market, url in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows: dict[str, list[Row]] = {}
    for market, elements in received:
        for table, found in parse_frames(elements, market).rows.items():
            rows.setdefault(table, []).extend(found)
    rows["depth_snapshots"] = _snapshots(base_url)
    return rows


def _receive(url: str, seconds: float, market: str, into: list[tuple[str, list[bytes]]]) -> None:
    """Frames with a clock mark every MARK_EVERY_MS, as a subscription task pushes them."""
    connection = websocket.create_connection(url, timeout=5)
    elements: list[bytes] = []
    marked = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            frame = connection.recv()
            at = now_ms()
            if at - marked >= MARK_EVERY_MS:
                elements.append(clock_mark(at))
                marked = at
            elements.append(frame.encode() if isinstance(frame, str) else frame)
    finally:
        connection.close()
    into.append((market, elements))


def market_rows(base_url: str, seconds: float) -> dict[str, list[Row]]:
    """The rows of `seconds` of the whole market's mix, with a clock mark per flush
    interval as a subscription task pushes them, and snapshots of a few of its books."""
    elements: list[bytes] = []
    ticks = market_ticks()
    for _ in range(round(seconds * 1000 / TICK_MS)):
        at, frames = next(ticks)
        if at % MARK_EVERY_MS < TICK_MS:
            elements.append(clock_mark(at))
        elements.extend(frames)
    rows = {table: found for table, found in parse_frames(elements).rows.items() if found}
    rows["depth_snapshots"] = _snapshots(base_url, MARKET_SNAPSHOT_SYMBOLS, 1)
    return rows


def _snapshots(base_url: str, symbols: Sequence[str] = SYMBOLS, per_symbol: int = SNAPSHOTS_PER_SYMBOL) -> list[Row]:
    rows = []
    for symbol in symbols:
        for _ in range(per_symbol):
            answer = requests.get(f"{base_url}/api/v3/depth", params={"symbol": symbol, "limit": "1000"}, timeout=10)
            answer.raise_for_status()
            rows.append(snapshot_row(symbol, answer.json(), now_ms()))
            time.sleep(0.5)
    return rows


def store(url: str, rows: Mapping[str, list[Row]]) -> Engine:
    engine = make_engine(url)
    create_schema(engine)
    with engine.begin() as conn:
        store_rows(conn, rows)
    return engine


def stored_rows(engine: Engine) -> dict[str, int]:
    """Rows per table as stored: fewer than parsed where a key repeats (a kline is
    replaced by each update until it closes)."""
    with engine.connect() as conn:
        return {name: int(conn.scalar(select(func.count()).select_from(table)) or 0) for name, table in TABLES.items()}


def sqlite_bytes(engine: Engine) -> dict[str, int]:
    """Pages of each table and its indexes (`dbstat`)."""
    with engine.connect() as conn:
        found = conn.execute(text("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"))
        owner = {name: table for name, table in found}
        sizes: dict[str, int] = {}
        for name, size in conn.execute(text("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")):
            table = owner.get(name, name)
            sizes[table] = sizes.get(table, 0) + int(size)
    return sizes


def postgres_bytes(engine: Engine) -> dict[str, int]:
    """Heap, indexes and TOAST of each table, over its partitions (a plain table has none)."""
    with engine.connect() as conn:
        return {
            name: int(
                conn.scalar(
                    text(
                        "SELECT COALESCE((SELECT SUM(pg_total_relation_size(relid)) FROM pg_partition_tree(:t) "
                        "WHERE isleaf), pg_total_relation_size(:t))"
                    ),
                    {"t": name},
                )
            )
            for name in TABLES
        }


def parquet_bytes(engine: Engine, archive: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, files) per table of the day files, the recorded day archived."""
    dayfiles.archive_days(engine, archive, now_ms() + 2 * DAY_MS)
    sizes: dict[str, int] = {}
    files: dict[str, int] = {}
    with engine.connect() as conn:
        for table, size in conn.execute(select(archived_days.c.table_name, archived_days.c.bytes)):
            sizes[table] = sizes.get(table, 0) + size
            files[table] = files.get(table, 0) + 1
    return sizes, files


def empty_parquet_bytes(table: str) -> int:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, dayfiles.parquet_schema(TABLES[table]), compression=dayfiles.COMPRESSION):
        pass
    return len(buffer.getvalue())


def per_row(
    rows: Mapping[str, int], full: Mapping[str, int], empty: Mapping[str, int], overhead_per_file: Mapping[str, int]
) -> dict[str, float]:
    return {
        table: round((full.get(table, 0) - empty.get(table, 0) - overhead_per_file.get(table, 0)) / count, 1)
        for table, count in rows.items()
        if count
    }


def measure(seconds: float, workdir: Path, databases: Databases, market: bool = False) -> dict[str, Any]:
    with LocalStack(workdir / "stack") as stack:
        if market:
            base_url = stack.start_fake_exchange(MARKET_FAKE_ARGS)
            rows = market_rows(base_url, seconds)
        else:
            base_url = stack.start_fake_exchange()
            rows = record(base_url, seconds)
    sqlite_empty = sqlite_bytes(store(f"sqlite:///{workdir / 'empty.db'}", {}))
    engine = store(f"sqlite:///{workdir / 'full.db'}", rows)
    counts = {table: rows for table, rows in stored_rows(engine).items() if rows}
    result: dict[str, Any] = {"seconds": seconds, "rows": counts}
    result["sqlite"] = per_row(counts, sqlite_bytes(engine), sqlite_empty, {})
    if not market:  # seconds of 1,500 symbols make thousands of day files of a few rows: no day file's figure
        parquet, files = parquet_bytes(engine, workdir / "archive")
        footers = {table: files.get(table, 0) * empty_parquet_bytes(table) for table in counts}
        result["parquet"] = per_row(counts, parquet, {}, footers)
        result["parquet_files"] = files
    if databases.server_url is not None:
        empty_url, full_url = databases.fresh(workdir / "-", "disk_empty"), databases.fresh(workdir / "-", "disk")
        result["postgresql"] = per_row(
            counts, postgres_bytes(store(full_url, rows)), postgres_bytes(store(empty_url, {})), {}
        )
    if market:
        result["market"] = {
            "symbols": MARKET_SYMBOLS,
            "rate": MARKET_RATE,
            "rows_per_day": market_rows_per_day(counts, seconds),
        }
    return result


def market_rows_per_day(counts: Mapping[str, int], seconds: float) -> dict[str, float]:
    """Rows a day of the market mix stores: the streams' tables at the sample's rate, and
    a depth snapshot of every book every DEPTH_SNAPSHOT_INTERVAL_SECONDS."""
    per_day = {table: count * DAY_SECONDS / seconds for table, count in counts.items() if table != "depth_snapshots"}
    per_day["depth_snapshots"] = MARKET_SYMBOLS * DAY_SECONDS / Settings.depth_snapshot_interval_seconds
    return per_day


def render(result: Mapping[str, Any]) -> str:
    backends = [name for name in ("sqlite", "postgresql", "parquet") if name in result]
    labels = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "parquet": "Parquet (zstd)"}
    lines = [
        "| Table | Rows | " + " | ".join(f"{labels[b]} bytes/row" for b in backends) + " |",
        "|---|---:|" + "---:|" * len(backends),
    ]
    for table, count in sorted(result["rows"].items()):
        lines.append(f"| {table} | {count} | " + " | ".join(str(result[b].get(table, "-")) for b in backends) + " |")
    return "\n".join(lines)


def render_day(result: Mapping[str, Any]) -> str:
    """What a day of the whole market costs, per table and in all, with and without depth."""
    per_day = result["market"]["rows_per_day"]
    backends = [name for name in ("sqlite", "postgresql", "parquet") if name in result]
    labels = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "parquet": "Parquet (zstd)"}
    lines = [
        "| Table | Rows/day | " + " | ".join(f"{labels[b]} GB/day" for b in backends) + " |",
        "|---|---:|" + "---:|" * len(backends),
    ]
    for table, rows in sorted(per_day.items()):
        sizes = " | ".join(f"{rows * result[b].get(table, 0) / 1e9:.1f}" for b in backends)
        lines.append(f"| {table} | {rows:,.0f} | {sizes} |")
    for label, tables in (("all", list(per_day)), ("without depth", [t for t in per_day if t not in DEPTH_TABLES])):
        rows = sum(per_day[t] for t in tables)
        sizes = " | ".join(f"{sum(per_day[t] * result[b].get(t, 0) for t in tables) / 1e9:.1f}" for b in backends)
        lines.append(f"| **{label}** | {rows:,.0f} | {sizes} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.disk", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to record (default: %(default)s)")
    parser.add_argument("--database-url", help="a PostgreSQL server to measure on (fresh databases are made)")
    parser.add_argument("--postgres", action="store_true", help="start a private PostgreSQL cluster for the run")
    parser.add_argument(
        "--market", action="store_true", help="the whole market's mix (1,500 symbols, 40,000 msg/s) and a day of it"
    )
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error(f"--seconds must be a number > 0, not {args.seconds:g}")
    server = start_private_server(durable=True) if args.postgres else None
    url = server.url() if server is not None else args.database_url
    databases = Databases(check_server(url) if url else None)
    try:
        with tempfile.TemporaryDirectory(prefix="binance-recorder-disk-") as workdir:
            result = measure(args.seconds, Path(workdir), databases, args.market)
    finally:
        databases.close()
        if server is not None:
            server.stop()
    print(render(result))
    if args.market:
        print()
        print(render_day(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
