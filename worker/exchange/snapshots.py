"""REST depth snapshots: the starting points of recorded order books.

Two reasons to fetch one. The drain puts a symbol in the "needs snapshot" set when its
book is unknown (first events, or a break in the diff-depth chain; see
worker/store/books.py), and takes it out again only while the stored snapshots are all
older than the break, so that a lagging snapshot is fetched again. And every
DEPTH_SNAPSHOT_INTERVAL_SECONDS each recorded book gets a fresh one, so that
rebuilding a book never replays more than that much diff-depth.

Only `tasks.snapshot_books` calls this, never the subscription task (which does no
REST): every request spends the shared weight budget of its market (spot: 50 per
1000-level snapshot; futures: 20, at most 1,000 levels, from the futures budget).
Each market's books are taken with that market's client (`BinanceRest.market`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import Connection, Table, func, select
from sqlalchemy.engine import Engine

from worker.exchange.ratelimit import RestUnavailable
from worker.exchange.rest import BinanceError, BinanceRest, UnknownSymbol
from worker.keys import RedisKeys, as_text
from worker.settings import Settings
from worker.store.books import book_tables, wanted_books
from worker.store.depth import snapshot_row
from worker.store.storage import store_rows
from worker.streams import market_named
from worker.times import now_ms

log = logging.getLogger(__name__)


def _due_for_refresh(conn: Connection, depth_snapshots: Table, symbols: set[str], since_ms: int) -> set[str]:
    """The symbols without a snapshot received since `since_ms`."""
    newest = dict(
        conn.execute(
            select(depth_snapshots.c.symbol, func.max(depth_snapshots.c.received_at))
            .where(depth_snapshots.c.symbol.in_(symbols))
            .group_by(depth_snapshots.c.symbol)
        ).all()
    )
    return {symbol for symbol in symbols if (newest.get(symbol) or 0) < since_ms}


def take_snapshots(
    settings: Settings, client: redis.Redis, database: Callable[[], Engine], rest: BinanceRest
) -> dict[str, Any]:
    """Fetch and store the snapshots that the books of `rest`'s market need or are due
    for; returns what was done.

    `database()` gives the engine, and is only called when a book is recorded: beat runs
    this every drain interval, and on a stack without order books it must not touch the
    database (a new worker's first tasks would only compete to create the schema).
    """
    keys, market = RedisKeys(settings.redis_prefix), market_named(rest.market)
    recorded = wanted_books(client, keys, market.name)
    needed = {as_text(s) for s in client.smembers(keys.books_needing_snapshot(market.name))}
    if not recorded:
        if needed:
            client.srem(keys.books_needing_snapshot(market.name), *needed)
        return {"stored": [], "failed": {}}
    engine = database()
    depth_snapshots = book_tables(market)[0]
    with engine.connect() as conn:
        since = now_ms() - int(settings.depth_snapshot_interval_seconds * 1000)
        due = _due_for_refresh(conn, depth_snapshots, recorded, since)
    stored, failed = [], {}
    for symbol in sorted((needed & recorded) | due):
        try:
            snapshot = rest.depth(symbol, settings.depth_snapshot_limit)
        except (BinanceError, UnknownSymbol, RestUnavailable) as error:
            failed[symbol] = str(error)
            log.warning("depth snapshot of %s failed: %s", symbol, error)
            continue
        with engine.begin() as conn:
            store_rows(conn, {depth_snapshots.name: [snapshot_row(symbol, snapshot, now_ms())]})
        stored.append(symbol)
    # Taken out whether fetched or no longer recorded: a drain that still finds only
    # older snapshots puts the symbol back.
    if needed:
        client.srem(keys.books_needing_snapshot(market.name), *needed)
    return {"stored": stored, "failed": failed}
