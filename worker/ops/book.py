"""Rebuilding a recorded order book at any past instant, or saying why it cannot be.

A book is a stored REST snapshot (`depth_snapshots`, or a futures market's
`<m>_depth_snapshots`) plus the diff-depth events after it (`depth_updates`), applied
in update-id order by Binance's rule of its market: an event continues the book when
its predecessor (`worker.store.books.predecessor`: spot `U - 1`, futures `pu`) is at
most the book's update id, which after a snapshot is the straddling rule (spot
`U <= lastUpdateId + 1`, futures `U <= lastUpdateId <= u`) and after an event the chain
(spot `U = previous u + 1`, futures `pu = previous u`); an overlap is harmless
(quantities are absolute), a level with quantity 0 goes away. The chain is checked again here, on the stored rows, so a
rebuilt book never rests on the drain's word: a missing event anywhere between the
snapshot and the instant makes the instant unknown ("inside a gap"), never a wrong book.

`book_at` is the contract other programs use; `book_steps` walks forward once for
exports (a book every step, streaming). Periodic snapshots (DEPTH_SNAPSHOT_INTERVAL_SECONDS)
bound how far a rebuild replays; one hour of depth@100ms is 36,000 events.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, null, select
from sqlalchemy.engine import Engine

from worker.store import dayfiles
from worker.store.books import book_tables, predecessor
from worker.store.depth import unpack_levels
from worker.store.partitions import DAY_MS
from worker.streams import SPOT, Market, market_named
from worker.times import iso_ms

_EVENTS_PER_FETCH = 5000


class BookUnknown(Exception):
    """The book cannot be known at that instant; the message says why and where the
    nearest known books are."""


@dataclass(frozen=True)
class Book:
    """A book at one instant: bids best (highest) first, asks best (lowest) first."""

    symbol: str
    update_id: int
    time: int  # event time of the last update applied, ms
    bids: list[tuple[float, float]]
    asks: list[tuple[float, float]]

    def as_json(self) -> dict[str, Any]:
        """The `book --json` contract: numbers, not strings."""
        return {
            "symbol": self.symbol,
            "update_id": self.update_id,
            "time": self.time,
            "bids": [[price, qty] for price, qty in self.bids],
            "asks": [[price, qty] for price, qty in self.asks],
        }


class _Levels:
    """The mutable book of a replay: price -> quantity per side.

    A snapshot holds the best DEPTH_SNAPSHOT_LIMIT levels of each side, not the whole
    book, so below its lowest bid (above its highest ask) only the levels that changed
    since are known, and the unchanged ones in between are not. Binance's docs warn
    about exactly this; `top` therefore reports no level beyond the snapshot's range,
    and a price that ran further than it gives fewer levels rather than a wrong book.
    """

    def __init__(self, bids: bytes, asks: bytes) -> None:
        self.bids = dict(unpack_levels(bids))
        self.asks = dict(unpack_levels(asks))
        self.lowest_known_bid = min(self.bids, default=0.0)
        self.highest_known_ask = max(self.asks, default=math.inf)

    def apply(self, bids: bytes, asks: bytes) -> None:
        for side, packed in ((self.bids, bids), (self.asks, asks)):
            for price, qty in unpack_levels(packed):
                if qty == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty

    def top(self, levels: int | None) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """The best `levels` of each side within the snapshot's range (all when None), best first."""
        bids = [level for level in self.bids.items() if level[0] >= self.lowest_known_bid]
        asks = [level for level in self.asks.items() if level[0] <= self.highest_known_ask]
        if levels is None:
            return sorted(bids, reverse=True), sorted(asks)
        return heapq.nlargest(levels, bids), heapq.nsmallest(levels, asks)


@dataclass
class _Replay:
    """A walk over the events after a snapshot, resyncing on later snapshots after a break."""

    conn: Connection
    market: Market
    symbol: str
    snapshot_ids: list[int]  # every stored snapshot of the symbol, ascending
    levels: _Levels | None = None  # None while the book is unknown
    update_id: int = 0
    time: int = 0
    break_first_id: int | None = None  # after a break, while unknown: the id after its predecessor (spot: U)

    def start(self, snapshot_id: int) -> None:
        depth_snapshots = book_tables(self.market)[0]
        bids, asks = self.conn.execute(
            select(depth_snapshots.c.bids, depth_snapshots.c.asks).where(
                depth_snapshots.c.symbol == self.symbol, depth_snapshots.c.last_update_id == snapshot_id
            )
        ).one()
        self.levels, self.update_id, self.break_first_id = _Levels(bids, asks), snapshot_id, None

    def step(self, final: int, first: int, pu: int | None, event_time: int, bids: bytes, asks: bytes) -> None:
        continues_from = predecessor(first, pu)
        if self.levels is not None and continues_from > self.update_id:  # events are missing
            self.levels, self.break_first_id = None, continues_from + 1
        if self.levels is None:
            self._resync_before(final, continues_from)
            if self.levels is not None and final == self.update_id:
                self.time = event_time  # the snapshot is the book right after this event
        if self.levels is None or final <= self.update_id:
            return
        self.levels.apply(bids, asks)
        self.update_id, self.time = final, event_time

    def continues_with(self, continues_from: int) -> bool:
        """Whether the book stays known up to an event that continues from `continues_from`."""
        return self.levels is not None and continues_from <= self.update_id

    def _resync_before(self, final: int, continues_from: int) -> None:
        """Start again from a snapshot this event straddles (or ends at), if one is stored."""
        index = bisect.bisect_left(self.snapshot_ids, continues_from)
        if index < len(self.snapshot_ids) and self.snapshot_ids[index] <= final:
            self.start(self.snapshot_ids[index])


def _snapshot_ids(conn: Connection, market: Market, symbol: str) -> list[int]:
    depth_snapshots = book_tables(market)[0]
    query = select(depth_snapshots.c.last_update_id).where(depth_snapshots.c.symbol == symbol)
    return list(conn.scalars(query.order_by(depth_snapshots.c.last_update_id)))


def _events(conn: Connection, market: Market, symbol: str, after_id: int, until_id: int | None = None) -> Iterator[Any]:
    """(final, first, pu or None, event_time, bids, asks) in update-id order, streamed."""
    columns = book_tables(market)[1].c
    pu = columns.prev_final_update_id if market.futures else null()
    query = select(columns.final_update_id, columns.first_update_id, pu, columns.event_time, columns.bids, columns.asks)
    query = query.where(columns.symbol == symbol, columns.final_update_id > after_id)
    if until_id is not None:
        query = query.where(columns.final_update_id <= until_id)
    result = conn.execution_options(yield_per=_EVENTS_PER_FETCH).execute(query.order_by(columns.final_update_id))
    for partition in result.partitions():
        yield from partition


def book_at(
    engine: Engine,
    symbol: str,
    at_ms: int,
    levels: int | None = None,
    archive_dir: Path | None = None,
    market: str = SPOT,
) -> Book:
    """The book of `market`'s `symbol` right after the last update with event time <=
    `at_ms`, with `levels` levels per side (all when None).

    Raises BookUnknown when `at_ms` is before the first stored snapshot or inside a
    gap (an update between the snapshot and the instant is missing), with a message
    that says which and where the nearest known books are.

    With `archive_dir` (ARCHIVE_DIR), an instant in a day deleted from the database is
    rebuilt from the day files of its day and the one before (`_ARCHIVE_MARGIN_MS`).
    """
    symbol, book_market = symbol.strip().upper(), market_named(market)
    with _readable(engine, archive_dir, book_market, symbol, at_ms, at_ms + 1) as source, source.connect() as conn:
        return _book_through(conn, book_market, symbol, _last_event_at(conn, book_market, symbol, at_ms), at_ms, levels)


_ARCHIVE_MARGIN_MS = DAY_MS
"""How far around a window a book read from day files looks: a snapshot is stored every
DEPTH_SNAPSHOT_INTERVAL_SECONDS (an hour), so a day before holds the one a book starts
from, and a day after the event that says whether the book is still known."""


@contextmanager
def _readable(
    engine: Engine, archive_dir: Path | None, market: Market, symbol: str, start_ms: int, end_ms: int
) -> Iterator[Engine]:
    tables = tuple(table.name for table in book_tables(market))
    start, end = start_ms - _ARCHIVE_MARGIN_MS, end_ms + _ARCHIVE_MARGIN_MS
    with dayfiles.readable(engine, archive_dir, tables, symbol, start, end) as source:
        yield source


def book_after_update(
    engine: Engine, symbol: str, update_id: int, levels: int | None = None, market: str = SPOT
) -> Book:
    """The book of `market`'s `symbol` right after the diff whose last update id is `update_id`.

    What a replay serves as `/api/v3/depth`: the book after the last diff it sent, so
    that the next diff starts at `update_id + 1`. Raises BookUnknown as `book_at` does.
    """
    symbol, book_market = symbol.strip().upper(), market_named(market)
    depth_updates = book_tables(book_market)[1]
    with engine.connect() as conn:
        row = conn.execute(
            select(depth_updates.c.event_time).where(
                depth_updates.c.symbol == symbol, depth_updates.c.final_update_id == update_id
            )
        ).first()
        at_ms = 0 if row is None else row[0]
        return _book_through(conn, book_market, symbol, None if row is None else (update_id, at_ms), at_ms, levels)


def _book_through(
    conn: Connection, market: Market, symbol: str, target: tuple[int, int] | None, at_ms: int, levels: int | None
) -> Book:
    """The book after the diff `target` (final update id, event time), asked for at `at_ms`."""
    snapshot_ids = _snapshot_ids(conn, market, symbol)
    index = bisect.bisect_right(snapshot_ids, target[0]) if target else 0
    if target is None or index == 0:
        raise BookUnknown(_before_first_message(conn, market, symbol, at_ms, snapshot_ids))
    replay = _Replay(conn, market, symbol, snapshot_ids)
    replay.start(snapshot_ids[index - 1])
    for event in _events(conn, market, symbol, replay.update_id, target[0]):
        replay.step(*event)
    following = _event_after(conn, market, symbol, target[0])
    if replay.levels is None or replay.update_id != target[0]:
        raise BookUnknown(_gap_message(replay, at_ms))
    if following is not None and following[1] > target[0]:
        replay.levels, replay.break_first_id = None, following[1] + 1
        raise BookUnknown(_gap_message(replay, at_ms))
    bids, asks = replay.levels.top(levels)
    return Book(symbol, replay.update_id, target[1], bids, asks)


def _last_event_at(conn: Connection, market: Market, symbol: str, at_ms: int) -> tuple[int, int] | None:
    """(final update id, event time) of the last update at or before `at_ms`."""
    columns = book_tables(market)[1].c
    row = conn.execute(
        select(columns.final_update_id, columns.event_time)
        .where(columns.symbol == symbol, columns.event_time <= at_ms)
        .order_by(columns.event_time.desc(), columns.final_update_id.desc())
        .limit(1)
    ).first()
    return None if row is None else (row[0], row[1])


def _event_after(conn: Connection, market: Market, symbol: str, after_id: int) -> tuple[int, int, int] | None:
    """(final id, the id it continues from, event time) of the first event that ends after `after_id`."""
    columns = book_tables(market)[1].c
    pu = columns.prev_final_update_id if market.futures else null()
    row = conn.execute(
        select(columns.final_update_id, columns.first_update_id, pu, columns.event_time)
        .where(columns.symbol == symbol, columns.final_update_id > after_id)
        .order_by(columns.final_update_id)
        .limit(1)
    ).first()
    return None if row is None else (row[0], predecessor(row[1], row[2]), row[3])


def _known_again(replay: _Replay, break_first_id: int) -> str:
    """Where the book is known again after a break: the first event on the next snapshot."""
    index = bisect.bisect_left(replay.snapshot_ids, break_first_id - 1)
    if index == len(replay.snapshot_ids):
        return "it is not known again yet (no snapshot stored after the gap)"
    return "it is known again from " + _first_book_text(
        replay.conn, replay.market, replay.symbol, replay.snapshot_ids[index]
    )


def _first_book_text(conn: Connection, market: Market, symbol: str, snapshot_id: int) -> str:
    first = _event_after(conn, market, symbol, snapshot_id)
    if first is None:
        return f"the snapshot at update id {snapshot_id} (no update drained after it yet)"
    return f"{iso_ms(first[2])} (update id {first[0]}, on the snapshot at {snapshot_id})"


def _before_first_message(conn: Connection, market: Market, symbol: str, at_ms: int, snapshot_ids: list[int]) -> str:
    depth_updates = book_tables(market)[1]
    if conn.scalar(select(depth_updates.c.final_update_id).where(depth_updates.c.symbol == symbol).limit(1)) is None:
        option = "" if market.name == SPOT else f" --market {market.name}"
        return (
            f"no {'' if market.name == SPOT else market.name + ' '}order book of {symbol} is recorded: "
            f"record it first (binance-recorder subscribe {symbol}{option} --streams depth@100ms)"
        )
    if not snapshot_ids:
        return (
            f"{iso_ms(at_ms)} is before the first snapshot of {symbol}: none is stored yet; "
            "is the beat running tasks.snapshot_books?"
        )
    return (
        f"{iso_ms(at_ms)} is before the first snapshot of {symbol}: the first known book is at "
        f"{_first_book_text(conn, market, symbol, snapshot_ids[0])}"
    )


def _gap_message(replay: _Replay, at_ms: int) -> str:
    known_until = f"{iso_ms(replay.time)} (update id {replay.update_id})" if replay.time else "its snapshot"
    again = _known_again(replay, replay.break_first_id or replay.update_id + 1)
    return (
        f"{iso_ms(at_ms)} is inside a gap of {replay.symbol}'s book: updates from id {replay.update_id + 1} "
        f"are missing; the book is known up to {known_until}, and {again}"
    )


def book_steps(
    engine: Engine,
    symbol: str,
    start_ms: int,
    end_ms: int,
    step_ms: int,
    levels: int,
    archive_dir: Path | None = None,
    market: str = SPOT,
) -> Iterator[tuple[int, int, list[tuple[float, float]], list[tuple[float, float]]]]:
    """(step time, update id, bids, asks) for each step start_ms, start_ms + step_ms, ...
    before end_ms at which the book is known, walking the events once (streaming).

    A step inside a gap (between the last update before a break and the first on the
    next snapshot), before the first snapshot or after the last drained update yields
    nothing: an export has no row for an instant whose book is unknown. With
    `archive_dir`, a window that reaches into days deleted from the database is read
    through a scratch copy of it from the day files and the database.
    """
    symbol, book_market = symbol.strip().upper(), market_named(market)
    with _readable(engine, archive_dir, book_market, symbol, start_ms, end_ms) as source, source.connect() as conn:
        snapshot_ids = _snapshot_ids(conn, book_market, symbol)
        if not snapshot_ids:
            raise BookUnknown(_before_first_message(conn, book_market, symbol, start_ms, snapshot_ids))
        at_start = _last_event_at(conn, book_market, symbol, start_ms)
        index = bisect.bisect_right(snapshot_ids, at_start[0]) if at_start else 0
        replay = _Replay(conn, book_market, symbol, snapshot_ids)
        replay.start(snapshot_ids[max(index - 1, 0)])
        replay.time = 0  # the snapshot's own time is unknown: no step before its first event
        step_at = start_ms
        for event in _events(conn, book_market, symbol, replay.update_id):
            known = replay.continues_with(predecessor(event[1], event[2])) and replay.time > 0
            event_time = event[3]
            while step_at < min(event_time, end_ms):
                if known:
                    yield (step_at, replay.update_id, *replay.levels.top(levels))  # type: ignore[union-attr]
                step_at += step_ms
            if step_at >= end_ms:
                return
            replay.step(*event)
        while replay.levels is not None and step_at <= min(replay.time, end_ms - 1):
            yield (step_at, replay.update_id, *replay.levels.top(levels))
            step_at += step_ms
