"""PostgreSQL only: the big event tables partitioned by day on their time column.

Retention then drops a whole day with one `DROP TABLE` (milliseconds, whatever its
size) instead of deleting its rows a chunk at a time (see "Retention on PostgreSQL" in
docs/postgresql.md for the figures, and `bench/retention.py`).

Which tables: those that grow with the market's activity and whose time column is
Binance's own, so that it is the same every time the same event arrives. A primary key
of a partitioned table must contain the partition column, so `trades` is keyed
`(symbol, trade_id, trade_time)`; a trade's time never changes, so that key still
stores a replayed or overlapping row once. `book_tickers` and `partial_depth` stay
plain: their time column is `received_at`, this machine's clock at the flush, which
differs between the two receipts of one update during a connection rotation (and may
be NULL), so a key containing it would store the overlap twice. Small tables (klines,
kept for ever by default; snapshots; block trades) stay plain too.

The futures markets' tables follow the same rule (`FUTURES_PARTITIONED`): their trades,
tickers and depth updates as spot's, and also their book tickers and partial depth,
whose payloads carry Binance's event time (their time column there), their mark and
index prices (every symbol every second or three). Liquidations (at most one a symbol
a second), klines of every price, composite indexes, snapshots, open interest and
funding rates are small and stay plain.

Every partitioned table has a DEFAULT partition for rows outside the daily ones (a
backfill of days before the first start, clocks far off). Daily partitions are
created ahead, `DAYS_AHEAD` days, on every start (`create_schema`) and on every
retention run, so the rows of today and tomorrow always find theirs. PostgreSQL refuses
to create a day's partition while the DEFAULT partition holds rows of that day; such a
day is skipped (reported), its rows stay in the default partition, and retention
deletes them there in chunks.

The functions take an engine or a connection; nothing here knows Redis or Celery.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Column, Connection, Engine, MetaData, Table, exc, text
from sqlalchemy.schema import CreateTable

from worker.store.storage import TABLES, TIME_COLUMNS
from worker.streams import FUTURES_MARKETS

DAY_MS = 86_400_000
DAYS_AHEAD = 7
"""Daily partitions exist from today to this many days ahead after every start and
every retention run (hourly), so rows never reach the default partition by waiting."""

FUTURES_PARTITIONED: tuple[str, ...] = (
    "trades",
    "agg_trades",
    "tickers",
    "mini_tickers",
    "book_tickers",
    "depth_updates",
    "partial_depth",
    "mark_prices",
    "index_prices",
)
"""Of a futures market's tables (without its prefix), those partitioned."""

PARTITIONED_TABLES: tuple[str, ...] = (
    "trades",
    "agg_trades",
    "tickers",
    "mini_tickers",
    "avg_prices",
    "depth_updates",
    "window_tickers",
    "reference_prices",
    *(
        market.table_prefix + base
        for market in FUTURES_MARKETS
        for base in FUTURES_PARTITIONED
        if base in market.base_tables
    ),
)
"""Created `PARTITION BY RANGE (<time column>)` in new PostgreSQL databases."""

DDL_LOCK_TIMEOUT = "2s"
"""Creating or dropping a partition locks the parent table exclusively, and waits for
every reader of it; an analyst's long query must not make the drain queue up behind
that wait. The DDL gives up after this long and the next run tries again."""

# Serialises partition DDL between processes (workers start together).
_ADVISORY_LOCK = 0x62696E70  # "binp"

_CHECK_VIOLATION = "23514"  # the default partition holds rows of the new range
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout
_INVALID_DEFINITION = "42P17"  # overlaps a partition made by hand


@dataclass(frozen=True)
class Partition:
    """One partition: `lower <= time < upper` in ms; both None for the default one."""

    name: str
    lower: int | None
    upper: int | None

    @property
    def is_default(self) -> bool:
        return self.lower is None


def day_start(ms: int) -> int:
    return ms - ms % DAY_MS


def partition_name(table: str, day_ms: int) -> str:
    day = datetime.datetime.fromtimestamp(day_ms / 1000, tz=datetime.UTC)
    return f"{table}_p{day:%Y%m%d}"


def default_partition_name(table: str) -> str:
    return f"{table}_default"


def partitioned_table(table: Table) -> Table:
    """`table` as PostgreSQL creates it partitioned: its time column joins the key."""
    time_column = TIME_COLUMNS[table.name]
    if table.c[time_column].nullable:
        raise ValueError(f"{table.name}.{time_column} may be NULL: it cannot be part of a primary key")
    columns = [
        Column(c.name, c.type, primary_key=c.primary_key or c.name == time_column, nullable=c.nullable)
        for c in table.columns
    ]
    return Table(table.name, MetaData(), *columns, postgresql_partition_by=f"RANGE ({time_column})")


def create_partitioned_tables(conn: Connection, names: Iterable[str] = PARTITIONED_TABLES) -> list[str]:
    """Create the missing tables of `names` partitioned, each with its default partition;
    tables that exist (plain ones of an older database too) are left as they are.
    Run it before `metadata.create_all`, which then skips them. Returns those created."""
    _lock(conn)
    created = []
    for name in names:
        if _relkind(conn, name) is None:
            conn.execute(CreateTable(partitioned_table(TABLES[name])))
            conn.exec_driver_sql(f"CREATE TABLE {default_partition_name(name)} PARTITION OF {name} DEFAULT")
            created.append(name)
    return created


def is_partitioned(conn: Connection, table: str) -> bool:
    return conn.dialect.name == "postgresql" and _relkind(conn, table) == "p"


def partitioned_tables(conn: Connection) -> list[str]:
    """The data tables of this database that are partitioned (none on SQLite)."""
    return [name for name in PARTITIONED_TABLES if is_partitioned(conn, name)]


def _relkind(conn: Connection, table: str) -> str | None:
    return conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
    ).scalar_one_or_none()


_BOUNDS = re.compile(r"FROM \('?(-?\d+)'?\) TO \('?(-?\d+)'?\)")


def list_partitions(conn: Connection, table: str) -> list[Partition]:
    """The partitions of `table`, the default one first, then by time."""
    found = conn.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    ).all()
    partitions = []
    for name, bound in found:
        match = _BOUNDS.search(bound)
        if match:
            partitions.append(Partition(name, int(match[1]), int(match[2])))
        else:  # DEFAULT (or MINVALUE/MAXVALUE bounds made by hand: treated as unknown)
            partitions.append(Partition(name, None, None))
    return sorted(partitions, key=lambda p: (p.lower is not None, p.lower or 0))


@dataclass
class Ensured:
    """What `ensure_partitions` did: partitions created, and days it had to skip."""

    created: list[str]
    skipped: dict[str, str]


def ensure_partitions(engine: Engine, now_ms: int, days_ahead: int = DAYS_AHEAD, days_back: int = 0) -> Ensured:
    """Create the daily partitions from `days_back` days before `now_ms`'s day to
    `days_ahead` days after it, in every partitioned table; idempotent and cheap when
    they exist (one catalog query per table). A day whose rows are already in the
    default partition, or whose lock is not granted in time, is skipped and named."""
    result = Ensured(created=[], skipped={})
    if engine.dialect.name != "postgresql":
        return result
    today = day_start(now_ms)
    days = [today + offset * DAY_MS for offset in range(-days_back, days_ahead + 1)]
    with engine.begin() as conn:
        tables = partitioned_tables(conn)
    for table in tables:
        with engine.begin() as conn:
            _lock(conn)
            existing = {p.name for p in list_partitions(conn, table)}
            for day in days:
                name = partition_name(table, day)
                if name in existing:
                    continue
                try:
                    with conn.begin_nested():
                        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
                        conn.exec_driver_sql(
                            f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ({day}) TO ({day + DAY_MS})"
                        )
                    result.created.append(name)
                except exc.DBAPIError as error:
                    state = getattr(error.orig, "sqlstate", None)
                    if state not in (_CHECK_VIOLATION, LOCK_NOT_AVAILABLE, _INVALID_DEFINITION):
                        raise
                    result.skipped[name] = str(error.orig).splitlines()[0]
    return result


def drop_partition(engine: Engine, partition: Partition) -> int:
    """Drop one partition; return its rows (PostgreSQL's estimate once the table has
    been analyzed, which autovacuum does as it fills; counted when it never was)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'")
        estimate = conn.execute(
            text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": partition.name}
        ).scalar_one()
        rows = (
            int(estimate)
            if estimate >= 0
            else conn.exec_driver_sql(f"SELECT count(*) FROM {partition.name}").scalar_one()
        )
        conn.exec_driver_sql(f"DROP TABLE {partition.name}")
    return rows


def chunk_delete_sql(table: str, relation: str, limit: int) -> str:
    """PostgreSQL's DELETE of at most `limit` rows of `relation` (a plain table, or one
    partition of `table`) timed before `%(cutoff)s`.

    By `ctid = ANY(ARRAY(subquery))`, which PostgreSQL runs as a TID scan: a lookup per
    row. Both `ctid IN (subquery)` and `(primary key) IN (subquery)` are planned as a
    hash semi-join over a scan of the whole table, every chunk: measured on 400,000
    trades, 425 ms for a chunk of 10,000 rows by primary key, 34 ms by ctid. A ctid
    names a row within one table, and a leaf partition is one.
    """
    time_column = TIME_COLUMNS[table]
    return (
        f"DELETE FROM {relation} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {relation} WHERE {time_column} < %(cutoff)s LIMIT {int(limit)}))"
    )


def _lock(conn: Connection) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK})
