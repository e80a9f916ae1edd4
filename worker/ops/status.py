"""A snapshot of the service's health, read straight from Redis and the database.

It needs no running worker, so the `status` command also works (and fails loudly)
when the workers are down — which is when it is needed. `problems()` turns a snapshot
into the list of things an operator must look at; an empty list means healthy.
"""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from worker.buffer import FrameBuffer
from worker.exchange.audit import latest_audits
from worker.exchange.listings import recent_listing_changes
from worker.exchange.rest import REST_URL_SETTINGS
from worker.exchange.snapshots import sync_outlook
from worker.groups import MORE_STREAM_PROCESSES, Group, GroupRegistry
from worker.keys import RedisKeys, as_text
from worker.settings import Settings
from worker.store.books import RESYNCING, BookState, book_states
from worker.store.drain import WATCHED_KINDS, drain_holders, stored_at_field
from worker.store.failures import storage_advice, storage_error
from worker.store.storage import TABLES, TIME_COLUMNS
from worker.streams import MARKETS, SPOT, market_named, stream_kind
from worker.times import now_ms

# Share of Redis's maxmemory past which `status` warns: with `noeviction` a full Redis
# refuses the frame pushes, and that is data loss.
REDIS_MEMORY_WARN_FRACTION = 0.8


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def group_statuses(client: redis.Redis, keys: RedisKeys, market: str | None = None) -> list[dict[str, Any]]:
    """The wanted groups (of `market` only, if given) with their connection's record."""
    registry = GroupRegistry(client, keys)
    stored = {as_text(field): int(ms) for field, ms in client.hgetall(keys.stored_at).items()}
    return [
        group_status(registry, FrameBuffer(client, keys), group, stored)
        for _gid, group in sorted(registry.wanted().items())
        if market is None or group.market == market
    ]


def group_status(registry: GroupRegistry, buffer: FrameBuffer, group: Group, stored: dict[str, int]) -> dict[str, Any]:
    """One group's figures: its connection's record in Redis, its backlog, and when each
    of its watched streams last stored (`stored`: the drain's `stored_at` marks)."""
    record = registry.status(group.id)
    return {
        "id": group.id,
        "market": group.market,
        "symbols": group.symbols,
        "streams": len(group.streams),
        "state": record.get("state", "queued"),
        "live": registry.has_live_lease(group.id),
        "worker": record.get("worker"),
        "connected_since": _int_or_none(record.get("connected_since")),
        "streams_changed_at": _int_or_none(record.get("streams_changed_at")),
        "stored_at": watched_streams(group, stored),
        "messages": int(record.get("messages", 0)),
        "messages_per_second": float(record.get("messages_per_second", 0)),
        "last_message_at": _int_or_none(record.get("last_message_at")),
        "reconnects": int(record.get("reconnects", 0)),
        "rotations": int(record.get("rotations", 0)),
        "last_error": record.get("last_error") or None,
        "backlog": buffer.backlog(registry.keys.frames(group.id, group.market)),
    }


def watched_fields(group: Group) -> dict[str, str]:
    """Each watched stream of `group` (trade, aggTrade, diff depth, mark price; not the
    all-market ones) -> its field in the drain's `stored_at` hash."""
    market = market_named(group.market)
    fields = {}
    for stream in group.streams:
        kind = stream_kind(stream)
        if kind in WATCHED_KINDS and kind in market.kinds and not stream.startswith("!"):
            fields[stream] = stored_at_field(market.table(kind), stream.partition("@")[0].upper())
    return fields


def watched_streams(group: Group, stored: dict[str, int]) -> dict[str, int | None]:
    """When each watched stream of `group` last stored rows in its market's table (None:
    never), from the drain's `stored_at` marks (`stored`): one HGETALL for all groups."""
    return {stream: stored.get(field) for stream, field in watched_fields(group).items()}


def silent_streams_of(client: redis.Redis, keys: RedisKeys, group: Group, stale_seconds: float) -> dict[str, float]:
    """`silent_streams` of one group, reading only its own marks (for its recording
    task's progress report, every few seconds)."""
    fields = list(dict.fromkeys(watched_fields(group).values()))
    values = client.hmget(keys.stored_at, fields) if fields else []
    stored = {field: int(value) for field, value in zip(fields, values, strict=True) if value is not None}
    status = group_status(GroupRegistry(client, keys), FrameBuffer(client, keys), group, stored)
    return silent_streams(status, now_ms(), stale_seconds)


def stream_silence(group: dict[str, Any], now: int) -> dict[str, float]:
    """Stream -> seconds without a stored row, for every watched stream of a connected
    group (none otherwise: a stream cannot store while its connection is down). Counted
    from the latest of the stream's last stored row, the connection's start and the
    group's last change of streams (a stream subscribed live has had no chance to store
    before it)."""
    if not group["live"] or group["state"] != "connected":
        return {}
    start = max(group["connected_since"] or now, group["streams_changed_at"] or 0)
    return {stream: (now - max(start, stored or 0)) / 1000 for stream, stored in group["stored_at"].items()}


def silent_streams(group: dict[str, Any], now: int, stale_seconds: float) -> dict[str, float]:
    """The streams of `stream_silence` silent for more than `stale_seconds` (0: never)."""
    if not stale_seconds:
        return {}
    return {stream: seconds for stream, seconds in stream_silence(group, now).items() if seconds > stale_seconds}


def recording_figures(
    client: redis.Redis, keys: RedisKeys, group: Group, progress: dict[str, object], stale_seconds: float
) -> dict[str, object]:
    """A recording task's progress figures with what `status` says of its group: the
    order books its diff-depth streams feed (of its market), as the drain follows them (the drain sends
    no events, so Flower shows them here), and its streams storing nothing while the
    connection is up. `group` is the group as it is now: books appear once depth
    streams join it."""
    figures = dict(progress)
    depth_symbols = {stream.split("@", 1)[0].upper() for stream in group.streams if stream_kind(stream) == "depth"}
    if depth_symbols:
        books = group_book_statuses(client, keys, group.market, depth_symbols)
        figures["books"] = {book.pop("symbol"): book for book in books}
    silent = silent_streams_of(client, keys, group, stale_seconds)
    if silent:
        figures["silent_streams"] = {stream: round(seconds) for stream, seconds in silent.items()}
    return figures


def market_subscription_statuses(
    registry: GroupRegistry, groups: list[dict[str, Any]], market: str | None = None
) -> list[dict[str, Any]]:
    """Each market subscription (of `market` only, if given) with the counts of its
    market's groups (`group_statuses`): the one line `status` shows for them, where a
    line per group would fill screens (1,500 symbols are six groups of 1,000-odd symbols)."""
    summaries = []
    for name, subscription in sorted(registry.market_subscriptions().items()):
        if market not in (None, name):
            continue
        mine = [group for group in groups if group["market"] == name]
        recording = sum(1 for group in mine if group["live"] and group["state"] == "connected")
        summaries.append(
            {
                "market": name,
                "kinds": list(subscription.kinds),
                "quote_assets": list(subscription.quote_assets),
                "statuses": list(subscription.statuses),
                "symbols": len({symbol for group in mine for symbol in group["symbols"]}),
                "streams": sum(group["streams"] for group in mine),
                "connections": len(mine),
                "recording": recording,
                "waiting": len(mine) - recording,
                "messages_per_second": round(sum(group["messages_per_second"] for group in mine), 1),
                "backlog": sum(group["backlog"] for group in mine),
            }
        )
    return summaries


def table_statuses(engine: Engine) -> dict[str, dict[str, int | None]]:
    result = {}
    with engine.connect() as conn:
        for name, time_column in TIME_COLUMNS.items():
            table = TABLES[name]
            rows, newest = conn.execute(select(func.count(), func.max(table.c[time_column]))).one()
            result[name] = {"rows": int(rows), "newest": newest}
    return result


def redis_memory(client: redis.Redis) -> dict[str, int]:
    """Redis's used memory against its `maxmemory` (0: no limit but the machine's)."""
    info = client.info("memory")
    return {"used": int(info["used_memory"]), "max": int(info.get("maxmemory", 0))}


BOOK_RESYNC_PATIENCE_MS = 60_000
"""A book unknown for longer than this is a problem: resyncing takes a drain or two plus
one snapshot request, a few seconds, unless snapshots fail or the stream is stuck."""


def book_statuses(client: redis.Redis, keys: RedisKeys, market: str | None = None) -> list[dict[str, Any]]:
    """Per market (or only `market`) and symbol with a diff-depth stream: the book's state
    as the drain follows it."""
    return [
        book_status(symbol, name, book)
        for name in MARKETS
        if market in (None, name)
        for symbol, book in book_states(client, keys, name).items()
    ]


def group_book_statuses(client: redis.Redis, keys: RedisKeys, market: str, symbols: set[str]) -> list[dict[str, Any]]:
    """`book_statuses` of one group's depth `symbols` only, read in one round trip: each
    recording task reports its books every few seconds, and reading the whole market's
    (1,500 books, a round trip each) for its 256 took three quarters of a streams
    process's main thread at the market mix (py-spy, docs/performance.md)."""
    mine = sorted({as_text(symbol) for symbol in client.smembers(keys.books(market))} & symbols)
    with client.pipeline(transaction=False) as pipe:
        for symbol in mine:
            pipe.hgetall(keys.book(symbol, market))
        stored = pipe.execute()
    return [
        book_status(symbol, market, BookState.from_hash(fields)) for symbol, fields in zip(mine, stored, strict=True)
    ]


def book_status(symbol: str, market: str, book: BookState) -> dict[str, Any]:
    """One line of `book_statuses`."""
    return {
        "symbol": symbol,
        "market": market,
        "state": book.state,
        "gap_since": book.gap_since,
        "last_update_id": book.last_update_id,
        "last_event_time": book.last_event_time,
        "updates_per_second": book.updates_per_second,
    }


def book_sync(
    settings: Settings, client: redis.Redis, keys: RedisKeys, market: str | None, now: int
) -> list[dict[str, Any]]:
    """Per market (or only `market`) that records books: how many are synced and when
    the rest will be (`worker.exchange.snapshots.sync_outlook`)."""
    outlooks = (sync_outlook(settings, client, keys, name, now) for name in MARKETS if market in (None, name))
    return [outlook.as_json() for outlook in outlooks if outlook.books]


def collect_status(
    settings: Settings, client: redis.Redis, engine: Engine, market: str | None = None
) -> dict[str, Any]:
    """The snapshot; `market` narrows the groups to that market's."""
    keys = RedisKeys(settings.redis_prefix)
    counters = {as_text(k): int(v) for k, v in client.hgetall(keys.counters).items()}
    buffer = FrameBuffer(client, keys)
    drains = drain_holders(client, keys, settings.drain_lanes)
    groups = group_statuses(client, keys, market)
    now = now_ms()
    return {
        "generated_at": now,
        "groups": groups,
        "market_subscriptions": market_subscription_statuses(GroupRegistry(client, keys), groups, market),
        "tables": table_statuses(engine),
        "audits": latest_audits(engine),
        "backlog": sum(buffer.backlog(key) for key in buffer.list_keys()),
        "drains": [{"lane": lane, "holder": holder} for lane, holder in drains.items()],
        "storage_error": storage_error(client, keys),
        "redis_memory": redis_memory(client),
        "books": book_statuses(client, keys, market),
        "book_sync": book_sync(settings, client, keys, market, now),
        "listing_changes": recent_listing_changes(engine),
        "dead_letters": counters.get("dead_letters", 0),
        "frames_drained": counters.get("frames_drained", 0),
        "frames_trimmed": counters.get("frames_trimmed", 0),
    }


def problems(snapshot: dict[str, Any], settings: Settings) -> list[str]:
    """What is wrong, in words an operator can act on; empty when all is well."""
    found = []
    now = snapshot["generated_at"]
    stale_ms = 2 * settings.silence_timeout_seconds * 1000
    behind = 20 * settings.drain_batch_size
    for group in snapshot["groups"]:
        where = "" if group["market"] == SPOT else f"{group['market']} "
        name = f"{where}group {group['id']} ({_symbols_text(group['symbols'])})"
        if not group["live"] and group["state"] == "waiting":
            found.append(f"{name} is waiting: {group['last_error']}")
        elif not group["live"]:
            found.append(
                f"{name} has no running task: start a `-Q streams` worker if none is up; if one is, "
                f"each of its processes already records a group: {MORE_STREAM_PROCESSES}"
            )
        elif group["state"] != "connected":
            found.append(f"{name} is {group['state']}: {group['last_error'] or 'no error recorded'}")
        last = group["last_message_at"]
        if group["live"] and last is not None and now - last > stale_ms:
            found.append(f"{name} received nothing for {(now - last) / 1000:.0f}s")
        for stream, seconds in silent_streams(group, now, settings.stale_stream_seconds).items():
            found.append(
                f"stream {stream} of {name} stored nothing for {seconds:.0f}s while its connection is up "
                f"(STALE_STREAM_SECONDS={settings.stale_stream_seconds:g}): does Binance still send it? "
                "A symbol that rarely trades needs a longer STALE_STREAM_SECONDS"
            )
        if group["backlog"] > behind:
            found.append(f"{name} has {group['backlog']} frames waiting in Redis: is the drain running?")
    found.extend(_book_problems(snapshot))
    found.extend(_storage_problems(snapshot))
    return found


PROBLEM_SYMBOLS = 5
"""Symbols a problem names per group: a group of a market subscription holds hundreds.
Also the books of a market named one a problem each before they are summed up in one."""


def _symbols_text(symbols: list[str]) -> str:
    named = ", ".join(symbols[:PROBLEM_SYMBOLS])
    return named if len(symbols) <= PROBLEM_SYMBOLS else f"{named} and {len(symbols) - PROBLEM_SYMBOLS} more"


def _book_problems(snapshot: dict[str, Any]) -> list[str]:
    """A problem per book unknown for over BOOK_RESYNC_PATIENCE_MS, or one per market when
    there are more than PROBLEM_SYMBOLS (a reconnect of a 1,024-stream group breaks every
    book it carries)."""
    now = snapshot["generated_at"]
    unknown: dict[str, list[tuple[int, str]]] = {}
    for book in snapshot.get("books", []):
        since = book["gap_since"]
        if book["state"] == RESYNCING and since is not None and now - since > BOOK_RESYNC_PATIENCE_MS:
            unknown.setdefault(book["market"], []).append((since, book["symbol"]))
    found: list[str] = []
    for market, books in unknown.items():
        where = "" if market == SPOT else market + " "
        ask = f"is beat running tasks.snapshot_books, and can it reach {REST_URL_SETTINGS[market]}?"
        if len(books) <= PROBLEM_SYMBOLS:
            found.extend(
                f"{where}order book of {symbol} unknown for {(now - since) / 1000:.0f}s: {ask}"
                for since, symbol in books
            )
            continue
        since, symbol = min(books)
        found.append(
            f"{len(books):,} {where}order books unknown for over {BOOK_RESYNC_PATIENCE_MS / 1000:.0f}s, {symbol}'s "
            f"for {(now - since) / 1000:.0f}s (`status --json` lists them, the books line says when the weight "
            f"budget reaches them): {ask}"
        )
    return found


def _storage_problems(snapshot: dict[str, Any]) -> list[str]:
    found = []
    failure = snapshot["storage_error"]
    if failure is not None:
        seconds = (snapshot["generated_at"] - failure["since"]) / 1000
        found.append(
            f"the drain cannot store since {seconds:.0f}s ({failure['failed_runs']} failed runs): {failure['error']}; "
            f"{snapshot['backlog']} frames wait in Redis and the backlog grows; {storage_advice(failure['error'])}"
        )
    memory = snapshot["redis_memory"]
    if memory["max"] and memory["used"] >= REDIS_MEMORY_WARN_FRACTION * memory["max"]:
        found.append(
            f"Redis uses {memory['used'] / memory['max']:.0%} of its maxmemory ({memory['used'] // 2**20} of "
            f"{memory['max'] // 2**20} MiB): when full it refuses the frame pushes; raise maxmemory or "
            "find what fills it (`redis-cli --bigkeys`)"
        )
    return found
