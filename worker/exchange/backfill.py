"""Filling holes from Binance's REST API: recent gaps (beat) and history ranges (on demand).

Both copy a series page by page (`copy_pages`): each page is stored in its own
transaction with the drain's insert-or-ignore (klines: upsert), so a page stored
twice, or a row the drain also stores later, is stored once. Every request goes
through the shared weight budget of `BinanceRest`.

A gap counts as filled only when the database holds every key of it afterwards:
what REST returned is checked against the table, not trusted.

A history job keeps a cursor in Redis after every committed page, so a run that was
interrupted (worker killed, REST unavailable) continues where it stopped, and a job
that finished answers at once. The engine knows nothing of Celery: it reports through
a `progress(done, total, rows)` callback, which the task turns into Celery states and
a CLI could turn into a progress bar.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis
from sqlalchemy.engine import Engine

from worker.exchange.gaps import FILLED, UNFILLABLE, Gap, close_gap, find_gaps, open_gaps, record_gaps, stored_keys
from worker.exchange.history import Series, TimeRangedSeries, series_by_time, series_for, series_of_streams
from worker.exchange.ratelimit import RestUnavailable
from worker.exchange.rest import MAX_LIMIT, BinanceError, BinanceRest, UnknownSymbol
from worker.groups import SYMBOL_PATTERN, GroupRegistry
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.settings import Settings
from worker.store.storage import store_rows
from worker.streams import MARKETS, SPOT, market_named, split_gap_kind
from worker.times import now_ms

log = logging.getLogger(__name__)

Progress = Callable[[int, int, int], None]
"""progress(done, total, rows): ms of the job's time range covered, of all, rows so far."""

JOB_CURSOR_TTL_SECONDS = 30 * 24 * 3600
"""How long Redis remembers a history job (its cursor, or that it is complete)."""

LOCK_MARGIN_SECONDS = 120.0
"""A run renews its lock after every page; the lock outlives the longest wait between
pages (a Binance ban up to REST_MAX_WAIT_SECONDS) by this much."""


def _nothing(*_: Any) -> None:
    """The default callback: nobody is watching."""


@dataclass(frozen=True)
class PageDone:
    """One committed page: the key to continue from, its rows and the newest row's time."""

    cursor: int
    rows: int
    last_time: int


def copy_pages(
    engine: Engine,
    rest: BinanceRest,
    series: Series,
    cursor: int,
    last: int | None = None,
    before_ms: int | None = None,
    page_limit: int = MAX_LIMIT,
) -> Iterator[PageDone]:
    """Copy the rows of `series` with key >= cursor, up to key `last` and time before
    `before_ms` (None: no bound), into the database; yields after each commit.

    Stops early when Binance has no more (a short or empty page): the caller compares
    what it wanted with what is stored.
    """
    while last is None or cursor <= last:
        limit = page_limit if last is None else min(page_limit, series.slots(cursor, last))
        page = series.fetch(rest, cursor, last, limit)
        rows = [row for row in page if _within(series, row, cursor, last, before_ms)]
        if rows:
            with engine.begin() as conn:
                store_rows(conn, {series.table_name: rows})
            cursor = rows[-1][series.key_index] + series.step
            yield PageDone(cursor, len(rows), rows[-1][series.time_index])
        if len(rows) < len(page) or len(page) < limit:
            return  # past the requested end, or Binance has nothing more (yet)


def _within(series: Series, row: tuple, cursor: int, last: int | None, before_ms: int | None) -> bool:
    key = row[series.key_index]
    return key >= cursor and (last is None or key <= last) and (before_ms is None or row[series.time_index] < before_ms)


@dataclass
class RepairReport:
    """What one run of the gap repair did; JSON-able as the task's result."""

    gaps_found: int = 0
    filled: int = 0
    unfillable: int = 0
    rows_fetched: int = 0
    left_open: int = 0
    stopped: str | None = None  # why the run stopped before the last open gap

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HistoryJob:
    """A time range [start, end) of one market's symbol's stream kind to fetch from REST."""

    symbol: str
    kind: str
    start: int
    end: int
    market: str = SPOT

    @classmethod
    def checked(
        cls, symbol: Any, kind: Any, start: Any, end: Any, market: Any = SPOT, by_time: bool = True
    ) -> HistoryJob:
        """The job, or ValueError saying what is wrong with the arguments; `by_time`
        False admits spot trades too (the archive's layered backfill finds them by time)."""
        if symbol is None or kind is None or start is None or end is None:
            raise ValueError(
                "a history backfill needs symbol, kind, start and end (ms since the epoch, "
                f"end excluded); got symbol={symbol!r} kind={kind!r} start={start!r} end={end!r}"
            )
        symbol = str(symbol).strip().upper()
        if not SYMBOL_PATTERN.match(symbol):
            raise ValueError(f"{symbol!r} is not a Binance symbol: use one such as 'BTCUSDT'")
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a time in ms since the epoch (an integer)")
        if start >= end:
            raise ValueError(f"start={start} must be before end={end} (ms since the epoch, end excluded)")
        market = market_named(str(market)).name
        series = series_by_time(symbol, kind, market) if by_time else series_for(symbol, kind, market)
        return cls(symbol, series.kind, start, end, series.market.name)

    @property
    def name(self) -> str:
        """The job's key; a futures market's carries its name (`BTCUSDT:usdm:aggTrade:...`)."""
        return f"{self.symbol}:{market_named(self.market).gap_kind(self.kind)}:{self.start}:{self.end}"

    @property
    def series(self) -> TimeRangedSeries:
        return series_by_time(self.symbol, self.kind, self.market)


@dataclass
class JobState:
    """A history job's progress as Redis keeps it between runs."""

    cursor: int | None = None  # key to continue from; None: not started, or no rows yet
    last: int | None = None  # last key of the range, when keys can tell it (klines)
    rows: int = 0
    done: int = 0  # ms of the range covered
    complete: bool = False


class Backfiller:
    """Copies missing rows from Binance's REST API into the database."""

    def __init__(
        self,
        engine: Engine,
        rest: BinanceRest,
        client: redis.Redis,
        keys: RedisKeys,
        page_limit: int = MAX_LIMIT,
    ) -> None:
        self.engine = engine
        self.rest = rest
        self.client = client
        self.keys = keys
        self.page_limit = page_limit

    # -- recent gaps -------------------------------------------------------------------

    def repair_recent_gaps(
        self, series: list[Series], since_ms: int, heartbeat: Callable[[], Any] = _nothing
    ) -> RepairReport:
        """Record the holes of `series` since `since_ms`, then fill every open gap.

        Gaps found by earlier runs that are still open (a run stopped by a long ban)
        are filled too. `heartbeat` is called after every page, to renew a lock.
        """
        report = RepairReport()
        with self.engine.begin() as conn:
            found = [gap for one in series for gap in find_gaps(conn, one, since_ms)]
            report.gaps_found = record_gaps(conn, found, now_ms())
            pending = open_gaps(conn, self.rest.market)
        for index, gap in enumerate(pending):
            try:
                status, rows = self._repair(gap, heartbeat)
            except RestUnavailable as error:
                report.stopped = str(error)
                report.left_open = len(pending) - index
                log.warning("gap repair stopped, %d gaps left open: %s", report.left_open, error)
                break
            report.rows_fetched += rows
            report.filled += status == FILLED
            report.unfillable += status == UNFILLABLE
        return report

    def _repair(self, gap: Gap, heartbeat: Callable[[], Any]) -> tuple[str, int]:
        """Fill one gap and record the outcome; returns (status, rows fetched)."""
        market, kind = split_gap_kind(gap.kind)
        series = series_for(gap.symbol, kind, market.name)
        rows, refusal = 0, None
        try:
            for page in copy_pages(
                self.engine, self.rest, series, gap.first_missing, last=gap.last_missing, page_limit=self.page_limit
            ):
                rows += page.rows
                heartbeat()
        except (BinanceError, UnknownSymbol) as error:
            refusal = f"Binance refused the request: {error}"
        with self.engine.begin() as conn:
            missing = series.slots(gap.first_missing, gap.last_missing) - stored_keys(
                conn, series, gap.first_missing, gap.last_missing
            )
            status = UNFILLABLE if missing else FILLED
            reason = (refusal or _shortfall(series, gap, missing, rows)) if missing else None
            close_gap(conn, gap, status, rows, now_ms(), reason)
        log.info(
            "gap %s %s..%s: %s, %d rows fetched%s",
            series,
            gap.first_missing,
            gap.last_missing,
            status,
            rows,
            f" ({reason})" if reason else "",
        )
        return status, rows

    # -- history -----------------------------------------------------------------------

    def history(self, job: HistoryJob, progress: Progress = _nothing) -> dict[str, Any]:
        """Fetch the job's range page by page, continuing where an earlier run stopped.

        The job is complete once its whole range lies in Binance's past and has been
        copied; a range that reaches into the future stays resumable, so running it
        again later fetches what has happened since.
        """
        series = job.series
        total = job.end - job.start
        state = self._load(job)
        resumed, rows_before = state != JobState(), state.rows
        if state.cursor is None and not state.complete:
            state.cursor, state.last = series.keys_between(self.rest, job.start, job.end)
        if state.cursor is not None and not state.complete:
            for page in copy_pages(
                self.engine,
                self.rest,
                series,
                state.cursor,
                last=state.last,
                before_ms=job.end,
                page_limit=self.page_limit,
            ):
                state.cursor = page.cursor
                state.rows += page.rows
                state.done = min(total, page.last_time + series.step - job.start)
                self._save(job, state)
                progress(state.done, total, state.rows)
        if not state.complete and job.end <= self.rest.server_time_ms():
            state.complete, state.done = True, total
            self._save(job, state)
        progress(state.done, total, state.rows)
        log.info(
            "history backfill %s: %d rows (%d this run), %s",
            job.name,
            state.rows,
            state.rows - rows_before,
            "complete" if state.complete else "to be continued",
        )
        return {
            **asdict(job),
            "rows": state.rows,
            "rows_this_run": state.rows - rows_before,
            "resumed": resumed,
            "complete": state.complete,
        }

    def _load(self, job: HistoryJob) -> JobState:
        raw = self.client.get(self.keys.backfill_job(job.name))
        return JobState(**json.loads(raw)) if raw else JobState()

    def _save(self, job: HistoryJob, state: JobState) -> None:
        self.client.set(self.keys.backfill_job(job.name), json.dumps(asdict(state)), ex=JOB_CURSOR_TTL_SECONDS)


def _shortfall(series: Series, gap: Gap, missing: int, rows: int) -> str:
    wanted = series.slots(gap.first_missing, gap.last_missing)
    return (
        f"{missing} of {wanted} missing {series.keys_are} are not available from Binance's "
        f"REST API (it returned {rows} rows); they may not exist yet or may never have existed"
    )


def run_history(
    settings: Settings, client: redis.Redis, engine: Engine, job: HistoryJob, progress: Progress = _nothing
) -> dict[str, Any]:
    """Run a history job under its lock, so the same range is never fetched twice at
    once (by a worker and by `binance-recorder backfill`, say)."""
    keys = RedisKeys(settings.redis_prefix)
    lock = _lock(settings, client, keys.backfill_job_lock(job.name), "history")
    if not lock.acquire():
        return {"skipped": f"a backfill of {job.name} is already running"}

    def renewing_progress(done: int, total: int, rows: int) -> None:
        lock.renew()
        progress(done, total, rows)

    try:
        return _backfiller(settings, client, engine, keys, job.market).history(job, renewing_progress)
    finally:
        lock.release()


def repair_wanted_streams(settings: Settings, client: redis.Redis, engine: Engine) -> dict[str, Any]:
    """Find and fill the gaps of the last BACKFILL_LOOKBACK_SECONDS in every wanted
    trade, aggTrade and kline stream, one run at a time across all workers. Each market
    is repaired through its own REST client; spot's report is the result, a futures
    market's is added under its name once it has streams to repair."""
    keys = RedisKeys(settings.redis_prefix)
    lock = _lock(settings, client, keys.backfill_lock, "backfill")
    if not lock.acquire():
        return {"skipped": "another backfill is running"}
    try:
        groups = list(GroupRegistry(client, keys).wanted().values())
        since = now_ms() - settings.backfill_lookback_seconds * 1000
        reports: dict[str, Any] = {}
        for market in MARKETS:
            streams = [stream for group in groups if group.market == market for stream in group.streams]
            if market != SPOT and not streams:
                continue  # no futures client is built, no Binance host asked, for a spot-only recorder
            backfiller = _backfiller(settings, client, engine, keys, market)
            reports[market] = backfiller.repair_recent_gaps(series_of_streams(streams, market), since, lock.renew)
        return {**reports.pop(SPOT).as_dict(), **{market: report.as_dict() for market, report in reports.items()}}
    finally:
        lock.release()


def _lock(settings: Settings, client: redis.Redis, key: str, owner: str) -> Lease:
    ttl = settings.rest_max_wait_seconds + LOCK_MARGIN_SECONDS
    return Lease(client, key, ttl_seconds=ttl, owner=owner)


def _backfiller(
    settings: Settings, client: redis.Redis, engine: Engine, keys: RedisKeys, market: str = SPOT
) -> Backfiller:
    rest = BinanceRest.from_settings(settings, client, market)
    return Backfiller(engine, rest, client, keys)
