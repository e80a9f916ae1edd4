"""The recorder's figures for Prometheus: `binance-recorder metrics` serves /metrics.

A small exporter process, not an instrumented worker: every scrape reads the state the
recording tasks, the drain and the REST client already keep in Redis (the same reads as
`status`, worker/ops/status.py) plus a few cheap database lookups, and renders it with
`prometheus-client`'s custom-collector API. So the figures are the service's, whichever
worker or machine produced them; nothing lives in the exporter that a restart would
lose, and there are no per-process metric files to clean up (the client library's
multiprocess mode needs them for prefork workers).

A scrape is cheap at any database size: the database is asked only for the newest row
of each table (an index lookup: every time column is indexed) and for the `gaps` table
grouped by kind and status (a few rows per hole found), never for a COUNT(*) of a data
table; rows stored come from counters the drain keeps (`rows_stored:<table>`).
Measured: on `binance-recorder run` recording 3 symbols (trade, depth, ticker), 20
scrapes took 3.5-11 ms (median 6 ms, `binance_recorder_scrape_duration_seconds`), 2.5-20
ms at a load average of 12; the database part on a SQLite file of 5 million trades
0.7 ms (12 ms cold), where the COUNT(*) of `status` took 321-584 ms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from worker.buffer import CLOCK_MARK_PREFIX, FrameBuffer, parse_clock_mark
from worker.exchange.ratelimit import FUTURES_POOL, MINUTE_MS, RedisLimitState
from worker.keys import RedisKeys, as_text
from worker.ops.status import book_statuses, book_sync, group_statuses, redis_memory, stream_silence
from worker.settings import Settings
from worker.store.books import RESYNCING, SYNCED
from worker.store.drain import ROWS_STORED_COUNTER, drain_holders, drain_lanes
from worker.store.failures import storage_error
from worker.store.storage import TABLES, TIME_COLUMNS, gaps
from worker.streams import MARKETS, SPOT
from worker.times import now_ms

PREFIX = "binance_recorder"

log = logging.getLogger(__name__)

# Service counters (RedisKeys.counters) exported as they are, with their help texts.
SERVICE_COUNTERS = {
    "frames_drained": "Frames the drain stored (or dead-lettered) and removed from Redis.",
    "frames_trimmed": "Frames cut from a full Redis list (REDIS_BUFFER_MAX_FRAMES) before the drain read them: lost "
    "until backfill repairs the gap.",
    "dead_letters": "Frames or rows the drain could not store, kept with the reason in the dead-letter list.",
}


def _seconds(ms: int | float) -> float:
    return ms / 1000


@dataclass(frozen=True)
class BufferList:
    """One frame list: its length and the receive time of its oldest frame, if known."""

    key: str
    length: int
    oldest_received_at: int | None


def buffer_lists(client: redis.Redis, keys: RedisKeys) -> list[BufferList]:
    """Every list the drain visits, in one round trip: the length, and the clock mark at
    the head, which is the receive time of the oldest frame waiting (the drain puts the
    mark back in front of what it leaves; a head cut by a trim has none)."""
    list_keys = FrameBuffer(client, keys).list_keys()
    with client.pipeline(transaction=False) as pipe:
        for key in list_keys:
            pipe.llen(key)
            pipe.lindex(key, 0)
        replies = pipe.execute()
    result = []
    for index, key in enumerate(list_keys):
        length, head = replies[2 * index], replies[2 * index + 1]
        result.append(BufferList(key, int(length), _mark_time(head)))
    return result


def _mark_time(head: bytes | None) -> int | None:
    """The receive time of a list's head if it is a clock mark, else None."""
    if head is None or head[:1] != CLOCK_MARK_PREFIX:
        return None
    try:
        return parse_clock_mark(head)[0]
    except ValueError:
        return None


def newest_rows(engine: Engine) -> dict[str, int]:
    """Table -> the time (ms) of its newest row, for the tables with rows: one index
    lookup each."""
    result = {}
    with engine.connect() as conn:
        for name, column in TIME_COLUMNS.items():
            newest = conn.execute(select(func.max(TABLES[name].c[column]))).scalar()
            if newest is not None:
                result[name] = int(newest)
    return result


def gap_counts(engine: Engine) -> dict[tuple[str, str], int]:
    """(kind, status) -> rows of the `gaps` table."""
    with engine.connect() as conn:
        rows = conn.execute(select(gaps.c.kind, gaps.c.status, func.count()).group_by(gaps.c.kind, gaps.c.status))
        return {(kind, status): int(count) for kind, status, count in rows}


def database_exists(engine: Engine) -> bool:
    """False for a SQLite file not created yet (the first drain creates it): reading it
    would create an empty file, where `status` would then find no tables."""
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return True
    return Path(engine.url.database).exists()


class RecorderCollector(Collector):
    """Reads the figures on every scrape (see the module's docstring)."""

    def __init__(self, settings: Settings, client: redis.Redis, engine: Engine) -> None:
        self.settings = settings
        self.client = client
        self.engine = engine
        self.keys = RedisKeys(settings.redis_prefix)

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        now = now_ms()
        try:
            from_redis = list(self._from_redis(now))  # read whole, so an outage half way yields none of it
        except redis.RedisError as error:
            log.warning("cannot read Redis: %s", error)
            from_redis = []
        yield _gauge(
            "redis_up", "1 when this scrape could read the recorder's state from Redis.", int(bool(from_redis))
        )
        yield from from_redis
        yield from self._database(now)
        yield _gauge("scrape_duration_seconds", "How long this scrape took to read the figures.", _elapsed(started))

    def _from_redis(self, now: int) -> Iterator[Metric]:
        yield from self._groups(now)
        yield from self._buffers(now)
        yield from self._drain()
        yield from self._books()
        yield from self._book_sync(now)
        yield from self._rest(now)
        memory = redis_memory(self.client)
        yield _gauge("redis_memory_used_bytes", "Memory Redis uses (INFO memory used_memory).", memory["used"])
        yield _gauge("redis_memory_max_bytes", "Redis's maxmemory; 0: no limit but the machine's.", memory["max"])

    def _groups(self, now: int) -> Iterator[Metric]:
        groups = group_statuses(self.client, self.keys)
        info = _family(
            GaugeMetricFamily, "group_info", "A wanted symbol group and its symbols (always 1).", ("group", "symbols")
        )
        up = _family(GaugeMetricFamily, "group_up", "1 while a running task holds the group's connection lease.")
        state = _family(
            GaugeMetricFamily,
            "group_state",
            "The group connection's state (starting, connected, reconnecting, waiting, stopped, queued): 1 for the "
            "current one.",
            ("group", "state"),
        )
        streams = _family(GaugeMetricFamily, "group_streams", "Streams the group's connection subscribes.")
        messages = _family(CounterMetricFamily, "group_messages", "Frames the group received and pushed to Redis.")
        rate = _family(GaugeMetricFamily, "group_messages_per_second", "The group's receive rate, as its task reports.")
        reconnects = _family(
            CounterMetricFamily, "group_reconnects", "Reconnects of the group's connection since its task started."
        )
        rotations = _family(
            CounterMetricFamily,
            "group_rotations",
            "Planned connection replacements (before Binance's 24 h cut) since the group's task started.",
        )
        age = _family(
            GaugeMetricFamily, "group_last_message_age_seconds", "Seconds since the group last pushed a frame."
        )
        silence = _family(
            GaugeMetricFamily,
            "stream_stored_age_seconds",
            "Seconds a watched stream (trade, aggTrade, depth, markPrice) of a connected group has stored no row: "
            "a stream Binance stopped sending while the connection stays up, as status warns past "
            "STALE_STREAM_SECONDS.",
            ("group", "stream"),
        )
        silent = _family(
            GaugeMetricFamily,
            "stream_silent",
            "1 for a watched stream of a connected group that stored nothing for STALE_STREAM_SECONDS (status's "
            "warning), else 0.",
            ("group", "stream"),
        )
        for group in groups:
            gid = group["id"]
            info.add_metric([gid, ",".join(group["symbols"])], 1)
            up.add_metric([gid], int(group["live"]))
            state.add_metric([gid, group["state"]], 1)
            streams.add_metric([gid], group["streams"])
            messages.add_metric([gid], group["messages"])
            rate.add_metric([gid], group["messages_per_second"])
            reconnects.add_metric([gid], group["reconnects"])
            rotations.add_metric([gid], group["rotations"])
            if group["last_message_at"] is not None:
                age.add_metric([gid], _seconds(max(0, now - group["last_message_at"])))
            stale = self.settings.stale_stream_seconds
            for stream, seconds in stream_silence(group, now).items():
                silence.add_metric([gid, stream], max(0.0, seconds))
                silent.add_metric([gid, stream], int(bool(stale) and seconds > stale))
        yield from (info, up, state, streams, messages, rate, reconnects, rotations, age, silence, silent)

    def _buffers(self, now: int) -> Iterator[Metric]:
        backlog = _family(
            GaugeMetricFamily,
            "buffer_backlog",
            "Elements (frames and clock marks) waiting in a group's Redis list for the drain.",
            ("group", "list"),
        )
        oldest = _family(
            GaugeMetricFamily,
            "buffer_oldest_frame_age_seconds",
            "How long the oldest frame waiting in a list has waited (0: empty): the drain's lag.",
            ("group", "list"),
        )
        for buffer in buffer_lists(self.client, self.keys):
            labels = [buffer.key.rsplit(":", 1)[-1], buffer.key]
            backlog.add_metric(labels, buffer.length)
            if buffer.length == 0:
                oldest.add_metric(labels, 0)
            elif buffer.oldest_received_at is not None:
                oldest.add_metric(labels, _seconds(max(0, now - buffer.oldest_received_at)))
        yield from (backlog, oldest)

    def _drain(self) -> Iterator[Metric]:
        counters = {as_text(k): int(v) for k, v in self.client.hgetall(self.keys.counters).items()}
        for name, text in SERVICE_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=counters.get(name, 0))
        stored = _family(
            CounterMetricFamily,
            "rows_stored",
            "Rows the drain inserted (klines: inserted or updated), counted as it acknowledges each batch.",
            ("table",),
        )
        for table in TABLES:
            stored.add_metric([table], counters.get(f"{ROWS_STORED_COUNTER}{table}", 0))
        yield stored
        lanes = drain_lanes(self.engine, self.settings.drain_lanes)
        yield _gauge(
            "drain_lanes", "Drain runs that may store side by side (1 on SQLite, DRAIN_LANES on PostgreSQL).", lanes
        )
        held = len(drain_holders(self.client, self.keys, lanes))
        yield _gauge("drain_lanes_held", "Lanes a drain run holds now: 0 means nothing stores.", held)
        failure = storage_error(self.client, self.keys) or {}
        failed_runs = failure.get("failed_runs", 0)
        yield _gauge(
            "storage_failing", "1 while drain runs fail to store (see `binance-recorder status`).", int(bool(failure))
        )
        yield _gauge(
            "storage_failed_runs",
            "Drain runs failed in a row in the current failure streak.",
            failed_runs if isinstance(failed_runs, int) else 0,
        )

    def _books(self) -> Iterator[Metric]:
        # Labelled by market too: BTCUSDT's spot and USDⓈ-M books are two books.
        books = book_statuses(self.client, self.keys)
        by_state = _family(
            GaugeMetricFamily, "books", "Recorded order books by state (synced, resyncing).", ("market", "state")
        )
        states = sorted({SYNCED, RESYNCING, *(book["state"] for book in books)})
        for market in MARKETS:
            for state in states:
                count = sum(1 for book in books if book["market"] == market and book["state"] == state)
                by_state.add_metric([market, state], count)
        synced = _family(
            GaugeMetricFamily, "book_synced", "1 while the symbol's order book is known.", ("market", "symbol")
        )
        rate = _family(
            GaugeMetricFamily,
            "book_updates_per_second",
            "Diff-depth events per second the drain follows.",
            ("market", "symbol"),
        )
        for book in books:
            synced.add_metric([book["market"], book["symbol"]], int(book["state"] == SYNCED))
            rate.add_metric([book["market"], book["symbol"]], book["updates_per_second"])
        yield from (by_state, synced, rate)

    def _book_sync(self, now: int) -> Iterator[Metric]:
        """When the books not synced yet will be, by the snapshot schedule's estimate."""
        remaining = _family(
            GaugeMetricFamily,
            "books_sync_remaining_seconds",
            "Seconds until every recorded order book of the market has had its snapshot, estimated from "
            "the snapshots still to take and the REST weight budget; 0 when all are synced.",
            ("market",),
        )
        for outlook in book_sync(self.settings, self.client, self.keys, None, now):
            rest_by = outlook["rest_by"]
            remaining.add_metric([outlook["market"]], _seconds(max(0, (rest_by or now) - now)))
        yield remaining

    def _rest(self, now: int) -> Iterator[Metric]:
        """Per weight pool: spot's, and the futures' one that USDⓈ-M and COIN-M share."""
        used = _family(
            GaugeMetricFamily,
            "rest_weight_used",
            "REST request weight spent in the current UTC minute by all workers (Binance counts per IP and minute).",
            ("pool",),
        )
        budget = _family(
            GaugeMetricFamily,
            "rest_weight_budget",
            "The weight all workers may spend per minute: REST_WEIGHT_BUDGET_PER_MINUTE (spot), "
            "FUTURES_REST_WEIGHT_BUDGET_PER_MINUTE (futures).",
            ("pool",),
        )
        blocked = _family(
            GaugeMetricFamily,
            "rest_blocked_seconds",
            "Seconds before REST requests may be sent again after Binance answered 429 (back off) or 418 (IP ban); "
            "0: they may.",
            ("pool",),
        )
        pools = (
            (SPOT, "", self.settings.rest_weight_budget_per_minute),
            (FUTURES_POOL, FUTURES_POOL, self.settings.futures_rest_weight_budget_per_minute),
        )
        for label, pool, pool_budget in pools:
            limits = RedisLimitState(self.client, self.keys, pool)
            used.add_metric([label], limits.used(now // MINUTE_MS))
            budget.add_metric([label], pool_budget)
            until, _kind = limits.blocked_until()
            blocked.add_metric([label], _seconds(max(0, until - now)))
        yield from (used, budget, blocked)

    def _database(self, now: int) -> Iterator[Metric]:
        """Figures from the database; a database that cannot be read (not created yet,
        locked out, down) gives `database_up 0` and none of them, not a failed scrape."""
        try:
            if not database_exists(self.engine):
                raise FileNotFoundError(f"no database at {self.engine.url.database} yet")
            newest, found = newest_rows(self.engine), gap_counts(self.engine)
        except (SQLAlchemyError, OSError) as error:
            log.warning("cannot read the database: %s", " ".join(str(error).split()))
            yield _gauge("database_up", "1 when this scrape could read the database.", 0)
            return
        yield _gauge("database_up", "1 when this scrape could read the database.", 1)
        age = _family(
            GaugeMetricFamily,
            "table_newest_row_age_seconds",
            "Seconds since the time of the newest row of each table (its time column: event, trade or receive time).",
            ("table",),
        )
        for table, newest_ms in newest.items():
            age.add_metric([table], _seconds(max(0, now - newest_ms)))
        yield age
        holes = _family(
            GaugeMetricFamily,
            "gaps",
            "Rows of the gaps table: holes found in the data, by kind (trade, aggTrade, kline_<interval>, depth) and "
            "status (open, filled, unfillable).",
            ("kind", "status"),
        )
        for (kind, status), count in sorted(found.items()):
            holes.add_metric([kind, status], count)
        yield holes


def _family(kind: Any, name: str, text: str, labels: Sequence[str] = ("group",)) -> Any:
    """A metric family of `kind` (counter, gauge) with the prefix, labelled by group unless told."""
    return kind(f"{PREFIX}_{name}", text, labels=list(labels))


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)


def _elapsed(started: float) -> float:
    return time.perf_counter() - started


def serve(settings: Settings, client: redis.Redis, engine: Engine, port: int, address: str) -> WSGIServer:
    """Serve /metrics on `address:port` from a background thread; returns the server
    (its `server_port` is the port taken when 0 asked for a free one)."""
    registry = CollectorRegistry()
    registry.register(RecorderCollector(settings, client, engine))
    server, _thread = start_http_server(port, address, registry)
    return server
