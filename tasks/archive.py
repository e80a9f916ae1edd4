"""The archiver task: beat runs it every ARCHIVE_INTERVAL_SECONDS (hourly)."""

from __future__ import annotations

import time
from typing import Any

from celery.utils.log import get_task_logger

from tasks.resources import engine, redis_client
from worker import app
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.settings import get_settings
from worker.store.dayfiles import archive_days
from worker.times import now_ms

log = get_task_logger(__name__)

# Renewed after every table-day written, so it has to outlive one day's files of one
# table: minutes for a busy market's trades. A killed run frees it an hour later, when
# beat's next run is due anyway.
LOCK_TTL_SECONDS = 3600.0


@app.task(name="tasks.archive_days")
def archive_closed_days() -> dict[str, Any]:
    """Write closed UTC days to day files (see `worker.store.dayfiles`); one run at a time,
    because two would write the same files."""
    settings = get_settings()
    lock = Lease(
        redis_client(), RedisKeys(settings.redis_prefix).archive_lock, ttl_seconds=LOCK_TTL_SECONDS, owner="archive"
    )
    if not lock.acquire():
        return {"skipped": "another archiver run is in progress"}
    started = time.monotonic()
    try:
        run = archive_days(engine(), settings.archive_path, now_ms(), keep_going=lock.renew)
    finally:
        lock.release()
    result = {**run.as_dict(), "seconds": round(time.monotonic() - started, 3)}
    log.info(
        "archiver wrote %d files (%d bytes), %d days unchanged, refused %s (%.1f s)%s",
        len(run.written),
        run.bytes,
        run.unchanged_days,
        run.refused,
        result["seconds"],
        "; lock lost, stopped early" if run.interrupted else "",
    )
    return result
