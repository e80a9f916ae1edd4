"""Order-book continuity, checked where diff-depth events are drained.

A diff-depth event is only useful on top of the book it changes, so one lost event
corrupts every book after it. The drain, not the socket thread, checks that each
symbol's events chain (an event with `u` at or below the last one is a rotation
overlap or a replayed batch, and is skipped) because it sees the events in order and
in batches, where the check costs nothing.

What chains differs by market, and is said once, by `predecessor`: the update id an
event continues from. A spot event continues from `U - 1` (spot's ids are per symbol and
contiguous: `U` = previous `u` + 1). A futures event carries it as `pu`, the previous
event's `u`, because futures ids are engine-wide and skip between a symbol's events. An
event continues a book at id X when its predecessor is at most X: after an event that is
Binance's `U = previous u + 1` (spot) and `pu = previous u` (futures); after a snapshot
at `lastUpdateId` it is the straddling rule of each (spot `U <= lastUpdateId + 1`,
futures `U <= lastUpdateId <= u`, or the first event after the snapshot).

A break (reconnect, rotation without overlap, Redis trim, lost frames) makes the
book unknown: a `gaps` row (kind `depth`, the event times of the last update before
and the first update after, in ms) records it, and the symbol goes into the
"needs snapshot" set, from which `tasks.snapshot_books` (worker/exchange/snapshots.py)
fetches a REST snapshot. Once a stored snapshot sits inside the events that followed
the break (its lastUpdateId at least the predecessor of the first event after it), the book is synced again
and the gap's end is the first event applied on top of the snapshot. A snapshot that
is older than the break (REST lags the streams) leaves the symbol in the set, so a
newer one is fetched.

The state per market and symbol lives in Redis (`RedisKeys.book`), where `status` reads it.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from copy import copy
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Connection, Table, func, select, update

from worker.groups import GroupRegistry
from worker.keys import RedisKeys, as_text
from worker.store.depth import unpack_levels
from worker.store.storage import TABLES, gaps, insert_or_ignore
from worker.streams import SPOT, Market, market_named, stream_kind

SYNCED, RESYNCING = "synced", "resyncing"
DEPTH_GAP_KIND = "depth"
UNFILLABLE = "unfillable"  # Binance serves no order-book history: a depth gap stays a gap
GAP_REASON = "order book unknown: diff-depth updates were lost and REST serves no past books"

# Column positions of a depth_updates row (see storage.depth_updates); futures rows
# add prev_final_update_id (`pu`) after the levels.
_SYMBOL, _FINAL, _FIRST, _TIME, _BIDS, _ASKS, _PU = 0, 1, 2, 3, 4, 5, 6


def predecessor(first: int, pu: int | None) -> int:
    """The update id a diff-depth event continues from: its `pu` (futures), else `U - 1`
    (spot, whose events carry none)."""
    return first - 1 if pu is None else pu


@dataclass
class BookState:
    """What the drain knows of one symbol's book."""

    state: str = RESYNCING
    last_update_id: int | None = None
    last_event_time: int | None = None
    resync_from: int | None = None  # predecessor of the first event after the break: a snapshot must reach it
    gap_since: int | None = None  # event time of the last update before the break
    updates_per_second: float = 0.0
    # The highest bid and lowest ask with a quantity in the newest diff of a synced book
    # that had one on that side: where its top is now, at least. A snapshot holds a
    # band of levels around the top of its moment; `tasks.snapshot_books` takes a fresh
    # one when these say the top is leaving that band (worker/exchange/snapshots.py).
    bid_seen: float | None = None
    ask_seen: float | None = None

    @classmethod
    def load(cls, client: redis.Redis, keys: RedisKeys, symbol: str, market: str = SPOT) -> BookState:
        return cls.from_hash(client.hgetall(keys.book(symbol, market)))

    @classmethod
    def from_hash(cls, stored: dict[Any, Any]) -> BookState:
        raw = {as_text(k): as_text(v) for k, v in stored.items()}
        ints = {name: int(raw[name]) if raw.get(name) else None for name in _INT_FIELDS}
        return cls(
            state=raw.get("state", RESYNCING),
            updates_per_second=float(raw.get("updates_per_second", 0)),
            bid_seen=float(raw["bid_seen"]) if raw.get("bid_seen") else None,
            ask_seen=float(raw["ask_seen"]) if raw.get("ask_seen") else None,
            **ints,
        )

    def as_fields(self) -> dict[str, str]:
        return {
            "state": self.state,
            "updates_per_second": f"{self.updates_per_second:.2f}",
            **{
                name: "" if getattr(self, name) is None else repr(getattr(self, name))
                for name in _INT_FIELDS + _PRICE_FIELDS
            },
        }


_INT_FIELDS = ("last_update_id", "last_event_time", "resync_from", "gap_since")
_PRICE_FIELDS = ("bid_seen", "ask_seen")


@dataclass
class FollowedBooks:
    """The book states after a batch, to be saved once the batch's transaction commits:
    saved before, a failed commit would leave Redis past events (and a gaps row) that
    were never stored, and the retried batch would not see the break again."""

    books: dict[str, BookState]
    needing_snapshot: list[str]
    market: str = SPOT

    @property
    def states(self) -> dict[str, str]:
        return {symbol: book.state for symbol, book in self.books.items()}

    def save(self, client: redis.Redis, keys: RedisKeys, listed: Container[str] = ()) -> int:
        """Save the states in one transaction, counted in `RedisKeys.book_saves`; returns
        the count this save left. `listed`: symbols known to be in the market's set of
        books already (`BookCache`), which need no SADD."""
        with client.pipeline(transaction=True) as pipe:
            for symbol, book in self.books.items():
                pipe.hset(keys.book(symbol, self.market), mapping={k: v for k, v in book.as_fields().items()})
            if unlisted := [symbol for symbol in self.books if symbol not in listed]:
                pipe.sadd(keys.books(self.market), *unlisted)
            if self.needing_snapshot:
                pipe.sadd(keys.books_needing_snapshot(self.market), *self.needing_snapshot)
            pipe.incr(keys.book_saves(self.market))
            return int(pipe.execute()[-1])


class BookCache:
    """The book states of one market that this drain run saved last, so that its rounds
    read none of them back from Redis.

    At the whole market's mix a round holds events of hundreds of books, and reading
    their states back every round (a pipelined HGETALL each) was most of a round's Redis
    work besides the claim and the acknowledgement (docs/performance.md). The cache is
    good only while nobody else saved a state of the market: every save increments
    `RedisKeys.book_saves` in its transaction, and a round first reads that counter
    (one GET). If it is the count this run's own last save left, the saved states are
    still Redis's; otherwise (a run of another lane met this one on a list, the lane
    moved to another process and back, Redis lost its data) the cache is dropped and
    the states are read again. A state handed out is a copy: the round changes it before
    its commit, which may fail."""

    def __init__(self, market: str = SPOT) -> None:
        self.market = market
        self._states: dict[str, BookState] = {}
        self._saves: int | None = None  # the count this cache's states were saved at

    def states(self, client: redis.Redis, keys: RedisKeys, symbols: Sequence[str]) -> dict[str, BookState]:
        """The current state of each of `symbols`' books: from the cache while it is good, else from Redis."""
        saves = client.get(keys.book_saves(self.market))
        if self._saves is None or saves is None or int(saves) != self._saves:
            self._forget()
        missing = [symbol for symbol in symbols if symbol not in self._states]
        loaded = load_states(client, keys, missing, self.market) if missing else {}
        return {symbol: copy(self._states[symbol]) if symbol in self._states else loaded[symbol] for symbol in symbols}

    def save(self, client: redis.Redis, keys: RedisKeys, followed: FollowedBooks) -> None:
        """Save `followed` (`FollowedBooks.save`) and keep its states. If another save came
        between this cache's last one and this one, only this save's states are known to
        be Redis's (they overwrote any other); a save after it shows in the counter."""
        last, self._saves = self._saves, None  # unknown if the save fails
        saves = followed.save(client, keys, listed=self._states)
        if last is None or saves != last + 1:
            self._states = {}
        self._states.update(followed.books)
        self._saves = saves

    def _forget(self) -> None:
        self._states, self._saves = {}, None


def follow_books(
    conn: Connection,
    client: redis.Redis,
    keys: RedisKeys,
    rows: Sequence[tuple[Any, ...]],
    now_ms: int,
    market: str = SPOT,
    cache: BookCache | None = None,
) -> FollowedBooks:
    """Follow each symbol's events in `rows` (`market`'s depth_updates rows, as received,
    stored in `conn`'s transaction): record breaks in `gaps` and resyncs, in that transaction.
    A replayed batch (the drain died before its ack) is followed again harmlessly: its
    events are at or below the saved update ids, and a gaps row is keyed by its start.
    The states come from `cache` (the drain run's), else from Redis."""
    by_symbol: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_symbol.setdefault(row[_SYMBOL], []).append(row)
    symbols = list(by_symbol)
    states = cache.states(client, keys, symbols) if cache else load_states(client, keys, symbols, market)
    followed = FollowedBooks(states, [], market)
    book_market = market_named(market)
    for symbol, events in by_symbol.items():
        _follow(conn, book_market, followed.books[symbol], symbol, events, now_ms)
    resyncing = [symbol for symbol, book in followed.books.items() if book.state == RESYNCING]
    newest = newest_snapshots(conn, book_market, resyncing)
    for symbol in resyncing:
        book = followed.books[symbol]
        if _try_resync(conn, book_market, book, symbol, newest.get(symbol)):
            followed.needing_snapshot.append(symbol)
    for symbol, book in followed.books.items():
        if book.state == SYNCED:
            _see_top(book, by_symbol[symbol])
    return followed


def newest_snapshots(conn: Connection, market: Market, symbols: Sequence[str]) -> dict[str, int]:
    """The newest stored snapshot's lastUpdateId of each of `symbols` that has one.

    One query for a batch's books being resynced. Until every book has a snapshot (1,500
    of them take many minutes of REST weight) nearly every depth event belongs to such a
    book; a query per book per batch took 38 % of the drain's time at the whole market's
    mix (profiled), and the drain stores that mix 1.43 times as fast without it
    (docs/performance.md). A book whose newest snapshot predates its break needs no more
    than this to know that it still needs one."""
    if not symbols:
        return {}
    depth_snapshots, _ = book_tables(market)
    found = conn.execute(
        select(depth_snapshots.c.symbol, func.max(depth_snapshots.c.last_update_id))
        .where(depth_snapshots.c.symbol.in_(symbols))
        .group_by(depth_snapshots.c.symbol)
    )
    return {symbol: int(last) for symbol, last in found}


RATE_SMOOTHING_MS = 10_000
"""The updates-per-second figure follows the event times with this time constant: a
drain round (one every flush, FLUSH_INTERVAL_MS) holds about one event of a depth@100ms book."""


def _follow(
    conn: Connection, market: Market, book: BookState, symbol: str, events: list[tuple[Any, ...]], now_ms: int
) -> None:
    previous_time = book.last_event_time
    applied_times = []
    for event in events:
        final, event_time = event[_FINAL], event[_TIME]
        continues_from = predecessor(event[_FIRST], event[_PU] if market.futures else None)
        last = book.last_update_id
        if last is not None and final <= last:
            continue  # a rotation overlap or a replayed batch: already followed
        if last is None or continues_from > last:
            _break(conn, market, book, symbol, continues_from, event_time, now_ms)
        book.last_update_id, book.last_event_time = final, event_time
        applied_times.append(event_time)
    if applied_times and previous_time is not None and applied_times[-1] > previous_time:
        _update_rate(book, len(applied_times), applied_times[-1] - previous_time)


_TOP_EVENTS = 16
"""The most diffs a round unpacks for a book's top: a side that none of them changes
keeps the price seen before."""


def _see_top(book: BookState, events: list[tuple[Any, ...]]) -> None:
    """Note the newest diff's highest bid and lowest ask that have a quantity (a diff
    often changes one side only: each side from the newest diff that holds one). Only
    the newest diffs are unpacked, not every event: a round holds about one event of a
    busy book, and the drain's time per row is what the whole market's load is judged by."""
    bid_seen = ask_seen = None
    for event in reversed(events[-_TOP_EVENTS:]):
        if bid_seen is None:
            bid_seen = max((price for price, qty in unpack_levels(event[_BIDS]) if qty), default=None)
        if ask_seen is None:
            ask_seen = min((price for price, qty in unpack_levels(event[_ASKS]) if qty), default=None)
        if bid_seen is not None and ask_seen is not None:
            break
    book.bid_seen = book.bid_seen if bid_seen is None else bid_seen
    book.ask_seen = book.ask_seen if ask_seen is None else ask_seen


def _update_rate(book: BookState, events: int, elapsed_ms: int) -> None:
    """An exponential average over time of the events per second since the last round."""
    rate = events * 1000 / elapsed_ms
    weight = 1.0 if book.updates_per_second == 0 else min(1.0, elapsed_ms / RATE_SMOOTHING_MS)
    book.updates_per_second += weight * (rate - book.updates_per_second)


def _break(
    conn: Connection, market: Market, book: BookState, symbol: str, continues_from: int, event_time: int, now_ms: int
) -> None:
    """Events are missing up to `continues_from` (or this is the first event ever seen)."""
    if book.state == SYNCED and book.last_event_time is not None:
        book.gap_since = book.last_event_time
        row = {
            "symbol": symbol, "kind": market.gap_kind(DEPTH_GAP_KIND), "first_missing": book.gap_since,
            "last_missing": event_time, "found_at": now_ms, "status": UNFILLABLE,
            "rows_fetched": 0, "reason": GAP_REASON,
        }  # fmt: skip
        conn.execute(insert_or_ignore(conn.dialect.name, gaps), row)
    book.state = RESYNCING
    book.resync_from = continues_from


def _try_resync(conn: Connection, market: Market, book: BookState, symbol: str, newest: int | None) -> bool:
    """Synced again once a stored snapshot falls inside the events since the break
    (`newest`: the symbol's newest stored snapshot, `newest_snapshots`).
    Returns whether a newer snapshot than the stored ones is needed."""
    if book.resync_from is None or book.last_update_id is None:
        return True
    if newest is None or newest < book.resync_from:
        return True  # none, or all older than the break (REST lags the streams)
    depth_snapshots, depth_updates = book_tables(market)
    snapshot_id = conn.scalar(
        select(func.min(depth_snapshots.c.last_update_id)).where(
            depth_snapshots.c.symbol == symbol,
            depth_snapshots.c.last_update_id >= book.resync_from,
        )
    )
    if snapshot_id is None:
        return True  # none, or all older than the break (REST lags the streams)
    if snapshot_id > book.last_update_id:
        return False  # newer than the events drained so far: a later drain syncs
    known_again = conn.scalar(
        select(depth_updates.c.event_time)
        .where(depth_updates.c.symbol == symbol, depth_updates.c.final_update_id > snapshot_id)
        .order_by(depth_updates.c.final_update_id)
        .limit(1)
    )
    if book.gap_since is not None and known_again is not None:
        conn.execute(
            update(gaps)
            .where(
                gaps.c.symbol == symbol,
                gaps.c.kind == market.gap_kind(DEPTH_GAP_KIND),
                gaps.c.first_missing == book.gap_since,
            )
            .values(last_missing=known_again)
        )
    book.state, book.resync_from, book.gap_since = SYNCED, None, None
    return False


def book_tables(market: Market) -> tuple[Table, Table]:
    """(depth_snapshots, depth_updates) of `market`: the two tables a book is made of."""
    return TABLES[market.table_prefix + "depth_snapshots"], TABLES[market.table_prefix + "depth_updates"]


def wanted_books(client: redis.Redis, keys: RedisKeys, market: str = SPOT) -> set[str]:
    """The symbols of `market` whose diff-depth stream is wanted now."""
    groups = GroupRegistry(client, keys).wanted().values()
    return {
        stream.partition("@")[0].upper()
        for group in groups
        if group.market == market
        for stream in group.streams
        if not stream.startswith("!") and stream_kind(stream) == "depth"
    }


def book_states(
    client: redis.Redis, keys: RedisKeys, market: str = SPOT, wanted: set[str] | None = None
) -> dict[str, BookState]:
    """The book state of every symbol of `market` whose diff depth is recorded now
    (`wanted`, if the caller has `wanted_books` already), by symbol (the drain keeps the
    state of an unsubscribed book: a new subscription continues it)."""
    wanted = wanted_books(client, keys, market) if wanted is None else wanted
    followed = {as_text(s) for s in client.smembers(keys.books(market))}
    return load_states(client, keys, sorted(followed & wanted), market)


# Every book's hash in one command (a flat field, value list each), for `load_states`.
_LOAD_STATES = """
local states = {}
for i, key in ipairs(KEYS) do
  states[i] = redis.call('HGETALL', key)
end
return states
"""


def load_states(
    client: redis.Redis, keys: RedisKeys, symbols: Sequence[str], market: str = SPOT
) -> dict[str, BookState]:
    """The stored state of each of `symbols`' books, in one command. `tasks.snapshot_books`
    reads every book every second, 1,500 of them for a whole market: a round trip per
    book cost 65 to 78 ms of CPU a read, a pipelined HGETALL per book 27 ms, this 16 to 21 ms
    (docs/performance.md)."""
    if not symbols:
        return {}
    stored = client.register_script(_LOAD_STATES)(keys=[keys.book(symbol, market) for symbol in symbols])
    return {
        symbol: BookState.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))
        for symbol, flat in zip(symbols, stored, strict=True)
    }
