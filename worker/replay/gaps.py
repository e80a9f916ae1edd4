"""The recorded gaps of a replay window, on the replay's clock (receive times).

The `gaps` table states holes by key: trade and aggregate trade ids, kline open times,
and for depth the event times of the last update before the book became unknown and
of the first one on the snapshot that made it known again. A replay needs them as
receive times: when the clock passes `begins_ms` the server closes the connections
that carry the stream, as Binance's disconnect would, and a client that reconnects
gets what was received from `ends_ms` on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, select

from worker.store.storage import agg_trades, depth_updates, gaps, trades
from worker.times import iso_ms

_ID_TABLES = {"trade": (trades, "trade_id"), "aggTrade": (agg_trades, "agg_id")}


@dataclass(frozen=True)
class ReplayGap:
    """A hole in one symbol's stream kind ("trade", "aggTrade", "kline_1m", "depth"),
    between the receive times of the last row before it and the first after it."""

    symbol: str
    kind: str
    begins_ms: int
    ends_ms: int
    status: str

    def as_json(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "kind": self.kind,
            "begins": self.begins_ms,
            "ends": self.ends_ms,
            "beginsIso": iso_ms(self.begins_ms),
            "endsIso": iso_ms(self.ends_ms),
            "status": self.status,
        }

    def affects(self, stream: str) -> bool:
        """Whether a stream name ("btcusdt@depth@100ms", "btcusdt@trade") carries this gap's rows."""
        symbol, _, kind = stream.partition("@")
        if symbol != self.symbol.lower():
            return False
        if self.kind == "depth":
            return kind == "depth" or kind.startswith("depth@")
        return kind == self.kind


def window_gaps(engine: Engine, start_ms: int, end_ms: int, symbols: list[str] | None) -> list[ReplayGap]:
    """The gaps that begin inside [start_ms, end_ms), by the time they begin."""
    with engine.connect() as conn:
        query = select(gaps.c.symbol, gaps.c.kind, gaps.c.first_missing, gaps.c.last_missing, gaps.c.status)
        if symbols is not None:
            query = query.where(gaps.c.symbol.in_(symbols))
        found = [_on_clock(conn, *row) for row in conn.execute(query)]
    return sorted(
        (gap for gap in found if gap is not None and start_ms <= gap.begins_ms < end_ms),
        key=lambda gap: (gap.begins_ms, gap.symbol, gap.kind),
    )


def _on_clock(
    conn: Connection, symbol: str, kind: str, first_missing: int, last_missing: int, status: str
) -> ReplayGap | None:
    """The gap in receive times; None when a row around it was never received (backfill only)."""
    if kind in _ID_TABLES:
        table, column = _ID_TABLES[kind]
        begins = _received(conn, table, column, symbol, first_missing - 1)
        ends = _received(conn, table, column, symbol, last_missing + 1)
    elif kind == "depth":
        begins = _received(conn, depth_updates, "event_time", symbol, first_missing)
        ends = _received(conn, depth_updates, "event_time", symbol, last_missing)
    else:  # kline_<interval>: open times, the nearest a kline row has to a receive time
        begins, ends = first_missing, last_missing
    if begins is None:
        return None
    return ReplayGap(symbol, kind, begins, ends if ends is not None else begins, status)


def _received(conn: Connection, table: Any, column: str, symbol: str, value: int) -> int | None:
    query = select(func.min(table.c.received_at)).where(table.c.symbol == symbol, table.c[column] == value)
    return conn.scalar(query)
