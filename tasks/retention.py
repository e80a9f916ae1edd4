"""The retention task: beat runs it every RETENTION_INTERVAL_SECONDS (hourly)."""

from __future__ import annotations

import time
from typing import Any

from celery.utils.log import get_task_logger

from tasks.resources import engine, redis_client
from worker import app
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.settings import get_settings
from worker.store.partitions import ensure_partitions
from worker.store.retention import RetentionPolicy, delete_expired_rows
from worker.times import now_ms

log = get_task_logger(__name__)

# The lock is renewed after every chunk, so it only has to outlive one chunk; a run
# whose worker was killed frees it this long afterwards, well before the next run.
LOCK_TTL_SECONDS = 300.0


@app.task(name="tasks.enforce_retention")
def enforce_retention() -> dict[str, Any]:
    """Delete rows past their age (see `worker.store.retention`); one run at a time.

    Two runs at once would only compete for SQLite's single write lock with each
    other and with the drain, so a second copy returns at once.
    """
    settings = get_settings()
    policy = RetentionPolicy.from_settings(settings)  # a bad setting fails before the lock
    lock = Lease(
        redis_client(),
        RedisKeys(settings.redis_prefix).retention_lock,
        ttl_seconds=LOCK_TTL_SECONDS,
        owner="retention",
    )
    if not lock.acquire():
        return {"skipped": "another retention run is in progress"}
    started = time.monotonic()
    try:
        # PostgreSQL's partitioned tables: the coming days' partitions, before their rows.
        ensured = ensure_partitions(engine(), now_ms())
        run = delete_expired_rows(engine(), policy, now_ms(), keep_going=lock.renew)
    finally:
        lock.release()
    result = {
        **run.as_dict(),
        "partitions_created": ensured.created,
        "partitions_skipped": ensured.skipped,
        "seconds": round(time.monotonic() - started, 3),
    }
    log.info(
        "retention deleted %s in %d chunks, dropped partitions %s (%.1f s)%s%s",
        run.deleted,
        run.chunks,
        run.dropped,
        result["seconds"],
        "; lock lost, stopped early" if run.interrupted else "",
        f"; partitions not created (their day's rows are in the default partition, or the lock was busy): "
        f"{ensured.skipped}"
        if ensured.skipped
        else "",
    )
    return result
