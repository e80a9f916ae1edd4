"""tasks.backfill: fill recent gaps (beat, no arguments) or fetch a history range (on demand)."""

from __future__ import annotations

from typing import Any

from worker import app
from worker.backfill import Backfiller, HistoryJob, Progress
from worker.buffer import now_ms
from worker.groups import GroupRegistry
from worker.history import series_of_streams
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.resources import engine, redis_client
from worker.rest import BinanceRest
from worker.settings import Settings, get_settings

# A run renews its lock after every page; the lock outlives the longest wait between
# pages (a Binance ban up to REST_MAX_WAIT_SECONDS) by this much.
LOCK_MARGIN_SECONDS = 120.0


@app.task(name="tasks.backfill", bind=True)
def backfill(
    self: Any, symbol: str | None = None, kind: str | None = None,
    start: int | None = None, end: int | None = None,
) -> dict[str, Any]:
    """Without arguments: find and fill the gaps of the last BACKFILL_LOOKBACK_SECONDS in
    every wanted trade, aggTrade and kline stream, one run at a time.

    With `symbol`, `kind` ("aggTrade" or "kline_<interval>"), `start` and `end` (ms
    since the epoch, end excluded): fetch that range from REST, resuming an earlier
    run of the same range; progress shows as state PROGRESS with meta
    {"done", "total", "rows"} (done and total in ms of the range).
    """
    settings = get_settings()
    if (symbol, kind, start, end) == (None, None, None, None):
        return _repair_recent_gaps(settings)

    def progress(done: int, total: int, rows: int) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "rows": rows})

    return run_history(settings, HistoryJob.checked(symbol, kind, start, end), progress)


def run_history(settings: Settings, job: HistoryJob, progress: Progress) -> dict[str, Any]:
    """Run a history job under its lock, so the same range is never fetched twice at
    once (by a worker and by `binance-recorder backfill`, say)."""
    keys = RedisKeys(settings.redis_prefix)
    lock = _lock(settings, keys.backfill_job_lock(job.name), "history")
    if not lock.acquire():
        return {"skipped": f"a backfill of {job.name} is already running"}

    def renewing_progress(done: int, total: int, rows: int) -> None:
        lock.renew()
        progress(done, total, rows)

    try:
        return _backfiller(settings, keys).history(job, renewing_progress)
    finally:
        lock.release()


def _repair_recent_gaps(settings: Settings) -> dict[str, Any]:
    keys = RedisKeys(settings.redis_prefix)
    lock = _lock(settings, keys.backfill_lock, "backfill")
    if not lock.acquire():
        return {"skipped": "another backfill is running"}
    try:
        groups = GroupRegistry(redis_client(), keys).wanted().values()
        series = series_of_streams([stream for group in groups for stream in group.streams])
        since = now_ms() - settings.backfill_lookback_seconds * 1000
        return _backfiller(settings, keys).repair_recent_gaps(series, since, lock.renew).as_dict()
    finally:
        lock.release()


def _lock(settings: Settings, key: str, owner: str) -> Lease:
    ttl = settings.rest_max_wait_seconds + LOCK_MARGIN_SECONDS
    return Lease(redis_client(), key, ttl_seconds=ttl, owner=owner)


def _backfiller(settings: Settings, keys: RedisKeys) -> Backfiller:
    rest = BinanceRest.from_settings(settings, redis_client())
    return Backfiller(engine(), rest, redis_client(), keys)
