"""Finding holes in stored series, and the `gaps` table that records them.

Trade ids and aggregate trade ids increase by exactly 1 per symbol, and kline open
times sit on a fixed grid, so a hole is visible in SQL: a row whose next key (LEAD,
a window function of SQLite >= 3.25 and PostgreSQL) is more than one step away. That
also finds the hole between the last row of a dropped connection and the first of
the next one. A hole after the newest stored row cannot be seen yet; the first row
of the next connection reveals it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, and_, func, select, update

from worker.exchange.history import Series
from worker.store.storage import gaps, insert_or_ignore
from worker.streams import SPOT, split_gap_kind

OPEN, FILLED, UNFILLABLE = "open", "filled", "unfillable"


@dataclass(frozen=True)
class Gap:
    """Keys first_missing..last_missing (both missing) of one series."""

    symbol: str
    kind: str
    first_missing: int
    last_missing: int
    id: int | None = None  # None until recorded


def find_gaps(conn: Connection, series: Series, since_ms: int) -> list[Gap]:
    """The holes between stored rows of `series` whose time is at or after `since_ms`."""
    table = series.table
    key = table.c[series.key_column]
    rows = (
        select(key.label("key"), func.lead(key).over(order_by=key).label("next_key"))
        .where(series.selects(), table.c[series.time_column] >= since_ms)
        .subquery()
    )
    holes = select(rows.c.key, rows.c.next_key).where(rows.c.next_key > rows.c.key + series.step)
    return [
        Gap(series.symbol, series.gap_kind, key + series.step, next_key - series.step)
        for key, next_key in conn.execute(holes.order_by(rows.c.key))
    ]


def record_gaps(conn: Connection, found: list[Gap], now_ms: int) -> int:
    """Add found gaps as open; one already recorded (same start) is left as it is.
    Returns how many were new."""
    if not found:
        return 0
    values = [
        {"symbol": g.symbol, "kind": g.kind, "first_missing": g.first_missing,
         "last_missing": g.last_missing, "found_at": now_ms, "status": OPEN, "rows_fetched": 0}
        for g in found
    ]  # fmt: skip
    statement = insert_or_ignore(conn.dialect.name, gaps)
    # Without preserve_rowcount, SQLAlchemy 2.1 reports -1 for an executemany on PostgreSQL.
    return conn.execute(statement, values, execution_options={"preserve_rowcount": True}).rowcount


def open_gaps(conn: Connection, market: str = SPOT) -> list[Gap]:
    """Every gap of `market` not yet filled or given up, oldest first."""
    query = select(gaps.c.symbol, gaps.c.kind, gaps.c.first_missing, gaps.c.last_missing, gaps.c.id)
    found = [Gap(*row) for row in conn.execute(query.where(gaps.c.status == OPEN).order_by(gaps.c.id))]
    return [gap for gap in found if split_gap_kind(gap.kind)[0].name == market]


def close_gap(
    conn: Connection, gap: Gap, status: str, rows_fetched: int, at_ms: int, reason: str | None = None
) -> None:
    """Mark a gap filled (with the time) or unfillable (with the reason)."""
    conn.execute(
        update(gaps)
        .where(gaps.c.id == gap.id)
        .values(
            status=status,
            rows_fetched=rows_fetched,
            reason=reason,
            filled_at=at_ms if status == FILLED else None,
        )
    )


def stored_keys(conn: Connection, series: Series, first: int, last: int) -> int:
    """How many rows of `series` are stored with a key in [first, last]."""
    key = series.table.c[series.key_column]
    query = select(func.count()).where(series.selects(), and_(key >= first, key <= last))
    return int(conn.execute(query).scalar_one())
