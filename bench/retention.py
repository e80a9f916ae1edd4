"""Retention on PostgreSQL: chunked deletes of a plain table against dropping the daily
partitions of a partitioned one, and what partitioning costs the drain's COPY.

Two copies of the real schema in one database (two PostgreSQL schemas, made and
dropped here): `trades` plain, as older versions created it, and partitioned by day,
as `create_schema` creates it now. The same rows, spread evenly over `days` days, go
into both through `store_rows` (the drain's COPY path), batch by batch, each batch a
transaction, alternating between the two so that a noisy machine slows both alike.
Then `delete_expired_rows` removes the first day from each (the plain table in chunks,
the partitioned one by dropping a partition), then half of the second day (chunks in
both: the partition holding the cutoff is deleted from as the plain table is).

    python -m bench.retention postgresql+psycopg://... [rows]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, func, select

from worker.store.partitions import DAY_MS, ensure_partitions
from worker.store.retention import RetentionPolicy, delete_expired_rows
from worker.store.storage import create_schema, store_rows, trades

START_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC, a day boundary
VARIANTS = ("plain", "partitioned")


def measure_retention(
    database_url: str,
    rows: int = 2_000_000,
    days: int = 4,
    symbols: int = 10,
    chunk_rows: int = 10_000,
    batch_rows: int = 5_000,
    keep: bool = False,
) -> dict[str, Any]:
    """Fill both variants with `rows` trades over `days` days; time the inserts and two
    retention runs. `keep` leaves the two schemas in place for a look afterwards."""
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    engines = {variant: _fresh_schema(admin, database_url, variant) for variant in VARIANTS}
    try:
        for variant, engine in engines.items():
            create_schema(engine, partitioned=variant == "partitioned", now_ms=START_MS)
            ensure_partitions(engine, START_MS, days_ahead=days)
        insert_seconds = dict.fromkeys(VARIANTS, 0.0)
        for batch in _batches(rows, days, symbols, batch_rows):
            for variant, engine in engines.items():
                started = time.perf_counter()
                with engine.begin() as conn:
                    store_rows(conn, {"trades": batch})
                insert_seconds[variant] += time.perf_counter() - started
        for engine in engines.values():
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE trades")
        result: dict[str, Any] = {
            "rows": rows,
            "days": days,
            "symbols": symbols,
            "chunk_rows": chunk_rows,
            "batch_rows": batch_rows,
            "insert": {
                variant: {"seconds": round(seconds, 3), "rows_per_second": round(rows / seconds)}
                for variant, seconds in insert_seconds.items()
            },
            "insert_ratio_partitioned_to_plain": round(insert_seconds["plain"] / insert_seconds["partitioned"], 3),
        }
        for step, cutoff in (("first_day", START_MS + DAY_MS), ("half_of_second_day", START_MS + DAY_MS * 3 // 2)):
            result[step] = {variant: _retention(engine, cutoff, chunk_rows) for variant, engine in engines.items()}
        result["rows_left"] = {variant: _count(engine) for variant, engine in engines.items()}
        return result
    finally:
        for variant, engine in engines.items():
            engine.dispose()
            if not keep:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {_schema(variant)} CASCADE")
        admin.dispose()


def _schema(variant: str) -> str:
    return f"bench_retention_{variant}"


def _fresh_schema(admin: Engine, database_url: str, variant: str) -> Engine:
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {_schema(variant)} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {_schema(variant)}")
    return create_engine(database_url, connect_args={"options": f"-c search_path={_schema(variant)}"})


def _batches(rows: int, days: int, symbols: int, batch_rows: int) -> Iterator[list[tuple[Any, ...]]]:
    """Trades of `symbols` interleaved symbols, evenly spaced in time over `days` days."""
    spacing = days * DAY_MS / rows
    names = [f"SYM{n}USDT" for n in range(symbols)]
    for first in range(0, rows, batch_rows):
        batch = []
        for n in range(first, min(first + batch_rows, rows)):
            at = START_MS + int(n * spacing)
            batch.append((names[n % symbols], n, 100.0 + n % 97, 0.5, at, n % 2 == 0, at, at + 5, 0))
        yield batch


def _retention(engine: Engine, cutoff: int, chunk_rows: int) -> dict[str, Any]:
    policy = RetentionPolicy(default_days=0, overrides={"trades": 1}, chunk_rows=chunk_rows)
    started = time.perf_counter()
    run = delete_expired_rows(engine, policy, cutoff + DAY_MS)
    seconds = time.perf_counter() - started
    removed = run.deleted["trades"] + run.dropped_rows.get("trades", 0)
    return {
        "method": run.methods["trades"],
        "seconds": round(seconds, 3),
        "rows_deleted_in_chunks": run.deleted["trades"],
        "chunks": run.chunks,
        "partitions_dropped": run.dropped.get("trades", []),
        "rows_in_dropped_partitions": run.dropped_rows.get("trades", 0),
        "rows_per_second": round(removed / seconds) if seconds else None,
    }


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(trades)).scalar_one())


def main() -> None:
    import json

    url = sys.argv[1]
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000_000
    print(json.dumps(measure_retention(url, rows), indent=2))


if __name__ == "__main__":
    main()
