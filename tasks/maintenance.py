"""Periodic tasks run by beat: drain, supervise, and the status snapshot."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready
from sqlalchemy.exc import SQLAlchemyError

from tasks.resources import engine, redis_client
from tasks.subscriptions import start_group
from worker import app
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.ops.status import collect_status
from worker.settings import get_settings
from worker.shutdown import shutting_down
from worker.store.drain import Drainer, DrainReport
from worker.store.failures import clear_storage_error, record_storage_error

# A drain run stops taking new batches after this many drain intervals, so that one
# slow run never holds the lock while the next beats pile up behind it.
DRAIN_RUN_INTERVALS = 10


@app.task(name="tasks.drain", send_events=False)  # one a second would bury the recording tasks in Flower
def drain() -> dict[str, Any]:
    """Move buffered frames into the database; one drain at a time (a Redis lock)."""
    settings = get_settings()
    keys = RedisKeys(settings.redis_prefix)
    budget = settings.drain_interval_seconds * DRAIN_RUN_INTERVALS
    lock = Lease(redis_client(), keys.drain_lock, ttl_seconds=budget + 60, owner="drain")
    if not lock.acquire():
        return {"skipped": "another drain is running"}
    try:
        return _store_buffered_frames(keys, settings.drain_batch_size, budget).as_dict()
    finally:
        lock.release()


def _store_buffered_frames(keys: RedisKeys, batch_size: int, budget: float) -> DrainReport:
    """One drain run. A storage failure is recorded for `status` and re-raised, so the
    run also shows as failed in Flower and the log; the next run that stores clears it."""
    try:
        drainer = Drainer(redis_client(), keys, engine(), batch_size)
        report = drainer.drain(time_budget=budget, should_stop=shutting_down)
    except SQLAlchemyError as error:
        record_storage_error(redis_client(), keys, error)
        raise
    clear_storage_error(redis_client(), keys)
    return report


@app.task(name="tasks.supervise")
def supervise() -> dict[str, list[str]]:
    """Restart every wanted group that has no live lease (its task died or was lost)."""
    settings = get_settings()
    registry = GroupRegistry(redis_client(), RedisKeys(settings.redis_prefix))
    restarted = []
    for group in registry.wanted().values():
        if not registry.has_live_lease(group.id) and start_group(group):
            restarted.append(group.id)
    return {"restarted": restarted}


@worker_ready.connect
def _supervise_when_a_worker_starts(**_: Any) -> None:
    """A worker that starts may be the one a killed worker's groups are waiting for.

    Their leases expire one TTL after the old task died, so supervise runs then too.
    """
    supervise.apply_async(ignore_result=True)  # housekeeping keeps no results (celeryconfig._every)
    supervise.apply_async(countdown=get_settings().lease_ttl_seconds + 1, ignore_result=True)


@app.task(name="tasks.status")
def status() -> dict[str, Any]:
    """A snapshot of groups, buffers, tables and dead letters (see `worker.ops.status`)."""
    return collect_status(get_settings(), redis_client(), engine())
