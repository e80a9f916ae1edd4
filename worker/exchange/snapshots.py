"""REST depth snapshots: the starting points of recorded order books, scheduled within
the weight budget.

Two reasons to fetch one. The drain puts a symbol in the "needs snapshot" set when its
book is unknown (first events, or a break in the diff-depth chain; see
worker/store/books.py), and takes it out again only while the stored snapshots are all
older than the break, so that a lagging snapshot is fetched again. And every
DEPTH_SNAPSHOT_INTERVAL_SECONDS each synced book gets a fresh one, so that rebuilding a
book never replays more than that much diff-depth.

Only `tasks.snapshot_books` calls this, never the subscription task (which does no
REST): every request spends the shared weight budget of its market (spot: 50 per
1000-level snapshot; futures: 20, at most 1,000 levels, from the futures budget).
Each market's books are taken with that market's client (`BinanceRest.market`).

Many books at once (a market subscribed whole, a reconnect of a 1,024-stream group)
need more weight than a minute holds, so each run is a plan (`plan_snapshots`):
unknown books before refreshes of known ones, the most active first (diff-depth events
per second, which the drain measures), the DEPTH_SNAPSHOT_DEEP_BOOKS most active at
DEPTH_SNAPSHOT_LIMIT levels and the rest at the cheapest depth; a run takes what this
minute's budget holds and leaves the rest to the next runs (beat starts one a second),
which plan again with the rates and breaks of then. docs/order-books.md has the
arithmetic; `sync_outlook` says when the books waiting now will all be synced.

A third reason comes between the two: a book whose top is leaving its snapshot's band.
A snapshot holds the best N levels a side, a band of prices around the top of its
moment; a rebuild knows the levels beyond it only where a diff changed them since, so
it shows no level past the band (worker/ops/book.py). A price that runs (the fake's
wave moved BTCUSDT about 1,550 ticks in five minutes, past a 1,000-level snapshot, and
`book --at` then showed no asks) needs a fresh snapshot before its top reaches the
band's edge: `TopBand` says where half of the band is spent, the drain notes where
the top is (`BookState.bid_seen`, `ask_seen`), and such books are planned right after
the unknown ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import Connection, Table, func, select
from sqlalchemy.engine import Engine

from worker.exchange.ratelimit import MINUTE_MS, RedisLimitState, RestUnavailable
from worker.exchange.rest import REST_RULES, BinanceError, BinanceRest, RestRules, UnknownSymbol
from worker.keys import RedisKeys, as_text
from worker.settings import Settings
from worker.store.books import SYNCED, BookState, book_states, book_tables, wanted_books
from worker.store.depth import snapshot_row
from worker.store.storage import store_rows
from worker.streams import market_named
from worker.times import now_ms

log = logging.getLogger(__name__)


def _newest_snapshot_times(conn: Connection, depth_snapshots: Table, symbols: set[str]) -> dict[str, int]:
    """When each of `symbols` that has a snapshot received its newest one (ms)."""
    if not symbols:
        return {}
    return dict(
        conn.execute(
            select(depth_snapshots.c.symbol, func.max(depth_snapshots.c.received_at))
            .where(depth_snapshots.c.symbol.in_(symbols))
            .group_by(depth_snapshots.c.symbol)
        ).all()
    )


BAND_MIN_AGE_MS = 10_000
"""A book gets no band refresh within this long of its last snapshot: a price that runs
through band after band (a thin book's 100 levels can be a few seconds of a fast move)
is followed at most this often."""
BAND_BUDGET_SHARE = 0.5
"""Band refreshes spend at most this share of a minute's weight budget. Without it,
1,500 books at the fake's price wave took every minute's whole budget (11 snapshots a
second, measured in the market bench), and the backfills and audits that share the
budget would wait behind books that are only getting shallower, not wrong."""


RATE_MEASURE_GRACE_MS = 5_000
"""A book the drain has seen in one round only has no rate yet (the drain measures it
from the second round that holds its events, within a second for a busy book). It
waits this long for one before it is taken as a quiet book, so that the first runs
after a whole market is subscribed do not spend the budget on books in no useful order."""


@dataclass(frozen=True)
class PlannedSnapshot:
    symbol: str
    limit: int
    weight: int
    spare: int = 0
    """Weight the minute's budget must still hold after this snapshot, or it is skipped."""


def by_activity(books: Mapping[str, BookState]) -> list[str]:
    """The symbols, the most diff-depth events per second first (ties by name)."""
    return sorted(books, key=lambda symbol: (-books[symbol].updates_per_second, symbol))


@dataclass(frozen=True)
class TopBand:
    """Where a book's top leaves the middle of the band its newest snapshot holds: a bid
    at or above `above` (the top ran up through half of the snapshot's asks), or an ask
    at or below `below`. A side answered with fewer levels than asked is the whole side:
    nothing lies beyond it to miss, so it sets no edge."""

    below: float
    above: float

    @classmethod
    def of_snapshot(cls, snapshot: Mapping[str, Any], limit: int) -> TopBand:
        bids, asks = snapshot["bids"], snapshot["asks"]
        full_bids, full_asks = len(bids) >= limit > 0, len(asks) >= limit > 0
        below = (float(bids[0][0]) + float(bids[-1][0])) / 2 if full_bids else -math.inf
        above = (float(asks[0][0]) + float(asks[-1][0])) / 2 if full_asks else math.inf
        return cls(below, above)

    @classmethod
    def parse(cls, stored: bytes | str) -> TopBand:
        below, above = as_text(stored).split()
        return cls(float(below), float(above))

    def encode(self) -> str:
        return f"{self.below!r} {self.above!r}"

    def left_by(self, book: BookState) -> bool:
        return (book.bid_seen is not None and book.bid_seen >= self.above) or (
            book.ask_seen is not None and book.ask_seen <= self.below
        )


def leaving_their_bands(client: redis.Redis, keys: RedisKeys, market: str, books: Mapping[str, BookState]) -> set[str]:
    """The synced books whose top the drain saw leave their newest snapshot's `TopBand`."""
    bands = {as_text(symbol): TopBand.parse(band) for symbol, band in client.hgetall(keys.book_bands(market)).items()}
    return {
        symbol
        for symbol, book in books.items()
        if book.state == SYNCED and symbol in bands and bands[symbol].left_by(book)
    }


def snapshot_limits(books: Mapping[str, BookState], settings: Settings, rules: RestRules) -> dict[str, int]:
    """Each book's snapshot depth: DEPTH_SNAPSHOT_LIMIT for the DEPTH_SNAPSHOT_DEEP_BOOKS
    most active, the cheapest weight's depth (spot: 100 levels, weight 5) for the others.

    A thin book changes rarely and is read at few levels; and a shallow snapshot is
    never wrong, only shallow: a rebuild reports no level beyond its snapshot's range
    (worker/ops/book.py), and a side that Binance answers with fewer levels than asked
    is the whole side."""
    deep = min(settings.depth_snapshot_limit, rules.max_depth_limit)
    thin = min(deep, rules.cheapest_depth_limit)
    return {
        symbol: deep if rank < settings.depth_snapshot_deep_books else thin
        for rank, symbol in enumerate(by_activity(books))
    }


def recorded_states(client: redis.Redis, keys: RedisKeys, market: str) -> dict[str, BookState]:
    """Every recorded book of `market` with the drain's state of it; a book the drain has
    not seen yet has the state of none (resyncing, no rate), so it ranks as the quietest."""
    wanted = wanted_books(client, keys, market)
    followed = book_states(client, keys, market, wanted)
    return {symbol: followed.get(symbol, BookState()) for symbol in wanted}


def plan_snapshots(
    books: Mapping[str, BookState],
    needed: set[str],
    due: set[str],
    settings: Settings,
    rules: RestRules,
    now: int,
    leaving: AbstractSet[str] = frozenset(),
) -> list[PlannedSnapshot]:
    """The snapshots to take, in order: the books that are unknown (`needed`), then the
    known ones whose top is leaving their snapshot's band (`leaving`), then those due
    for a refresh (`due`), each the most active first. A book still without a rate
    (`RATE_MEASURE_GRACE_MS`) is left for a later run. `books` holds every recorded
    book's state (`recorded_states`)."""
    limits = snapshot_limits(books, settings, rules)
    order = by_activity(books)
    unknown = [s for s in order if s in needed and books[s].state != SYNCED and not _unmeasured(books[s], now)]
    running = [s for s in order if s in leaving and s not in needed]
    refresh = [s for s in order if s in due and s not in needed and s not in leaving]
    band_spare = int(rules.budget_per_minute(settings) * (1 - BAND_BUDGET_SHARE))
    return [
        PlannedSnapshot(s, limits[s], rules.depth_weight(limits[s]), band_spare if s in running else 0)
        for s in unknown + running + refresh
    ]


def _unmeasured(book: BookState, now: int) -> bool:
    return (
        book.updates_per_second == 0
        and book.last_event_time is not None
        and now - book.last_event_time < RATE_MEASURE_GRACE_MS
    )


def take_snapshots(
    settings: Settings,
    client: redis.Redis,
    database: Callable[[], Engine],
    rest: BinanceRest,
    still_mine: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Fetch and store the snapshots that the books of `rest`'s market need or are due
    for, as many as this minute's budget holds (`plan_snapshots` says which first);
    returns what was done and how many planned ones wait for a later run.

    `database()` gives the engine, and is only called when a book is recorded: beat runs
    this every drain interval, and on a stack without order books it must not touch the
    database (a new worker's first tasks would only compete to create the schema).
    `still_mine()` is asked before each snapshot (the task renews its lock with it): a
    minute of budget can be hundreds of snapshots, and a run that lost its lock stops
    rather than take them a second time beside the run that holds it now.
    """
    keys, market = RedisKeys(settings.redis_prefix), market_named(rest.market)
    needed_key = keys.books_needing_snapshot(market.name)
    needed = {as_text(s) for s in client.smembers(needed_key)}
    if not rest.pacer.has_room(rest.rules.depth_weight(rest.rules.cheapest_depth_limit)):
        # No snapshot fits this minute: spare reading every book's state (beat ticks every
        # second; a whole market's 1,500 books take minutes of budget to sync).
        return {"stored": [], "failed": {}, "waiting": len(needed)}
    books = recorded_states(client, keys, market.name)
    synced = {symbol for symbol, book in books.items() if book.state == SYNCED}
    # No longer recorded, or synced since (a drain found an earlier snapshot good enough).
    done_with = needed - (books.keys() - synced)
    if done_with:
        client.srem(needed_key, *done_with)
    if not books:
        return {"stored": [], "failed": {}, "waiting": 0}
    engine = database()
    depth_snapshots = book_tables(market)[0]
    with engine.connect() as conn:
        newest = _newest_snapshot_times(conn, depth_snapshots, synced)
    now = now_ms()
    due = {s for s in synced if newest.get(s, 0) < now - settings.depth_snapshot_interval_seconds * 1000}
    leaving = {
        s for s in leaving_their_bands(client, keys, market.name, books) if newest.get(s, 0) < now - BAND_MIN_AGE_MS
    }
    plan = plan_snapshots(books, needed - done_with, due, settings, rest.rules, now, leaving)
    stored: list[str] = []
    failed: dict[str, str] = {}
    for planned in plan:
        if not still_mine():
            break
        if not rest.pacer.has_room(planned.weight + planned.spare):
            if planned.spare:
                continue  # the band refreshes' share is spent: the refreshes by age may still fit
            break
        try:
            snapshot = rest.depth(planned.symbol, planned.limit)
        except (BinanceError, UnknownSymbol, RestUnavailable) as error:
            failed[planned.symbol] = str(error)
            log.warning("depth snapshot of %s failed: %s", planned.symbol, error)
        else:
            with engine.begin() as conn:
                store_rows(conn, {depth_snapshots.name: [snapshot_row(planned.symbol, snapshot, now_ms())]})
            band = TopBand.of_snapshot(snapshot, planned.limit)
            client.hset(keys.book_bands(market.name), planned.symbol, band.encode())
            stored.append(planned.symbol)
        # Taken out once fetched (or failed): a drain that still finds only older
        # snapshots puts the symbol back.
        client.srem(needed_key, planned.symbol)
    return {"stored": stored, "failed": failed, "waiting": len(plan) - len(stored) - len(failed)}


@dataclass(frozen=True)
class SyncOutlook:
    """How far the books of one market are from all synced, for `status`."""

    market: str
    books: int
    synced: int
    waiting_weight: int
    """The weight of the snapshots still to take for the books not synced yet."""
    budget_per_minute: int
    rest_by: int | None
    """When the last of them will have its snapshot (ms), at the budget; None when all are synced."""

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sync_outlook(settings: Settings, client: redis.Redis, keys: RedisKeys, market: str, now: int) -> SyncOutlook:
    """The synced books of `market` and when the rest will be: their planned snapshots'
    weight spent at the budget, after what this minute has left. An estimate: other REST
    users of the budget (backfills, audits) and lagging snapshots that must be taken
    again delay it."""
    rules = REST_RULES[market]
    books = recorded_states(client, keys, market)
    needed = {as_text(s) for s in client.smembers(keys.books_needing_snapshot(market))}
    limits = snapshot_limits(books, settings, rules)
    unsynced = [symbol for symbol, book in books.items() if book.state != SYNCED]
    # A book out of the set and still resyncing has its snapshot: the drain has yet to
    # see the events that follow it. One the drain has not seen at all (no update id
    # yet) will need one.
    to_take = [symbol for symbol in unsynced if symbol in needed or books[symbol].last_update_id is None]
    weight = sum(rules.depth_weight(limits[symbol]) for symbol in to_take)
    budget = rules.budget_per_minute(settings)
    used = RedisLimitState(client, keys, rules.pool).used(now // MINUTE_MS)
    rest_by = finish_time(weight, used, budget, now) if unsynced else None
    return SyncOutlook(market, len(books), len(books) - len(unsynced), weight, budget, rest_by)


def finish_time(weight: int, used: int, budget: int, now: int) -> int:
    """When `weight` more is spent at `budget` a minute, `used` of this minute's spent (ms):
    now if this minute holds it, else early in the minute whose budget holds the last of it
    (a run takes its snapshots within a second or two of the minute's start)."""
    left = max(0, budget - used)
    if weight <= left:
        return now
    minutes = -(-(weight - left) // budget)
    return now - now % MINUTE_MS + minutes * MINUTE_MS
