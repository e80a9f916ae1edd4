"""Periodic tasks run by beat: drain, supervise, the listing follower, and the status snapshot."""

from __future__ import annotations

import contextlib
from typing import Any

from celery.signals import worker_ready
from sqlalchemy.exc import SQLAlchemyError

from tasks.resources import engine, redis_client
from tasks.subscriptions import start_group
from tasks.workers import node_processes
from worker import app
from worker.exchange.listings import ListingWatch, follow_listings
from worker.exchange.rest import BinanceRest
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.ops.status import collect_status
from worker.settings import get_settings
from worker.shutdown import shutting_down
from worker.store.drain import Drainer, DrainLanes, drain_lanes, take_a_lane
from worker.store.failures import clear_storage_error, record_storage_error
from worker.times import now_ms

# A drain run's window, in drain intervals: it asks for relief after it, and the next
# tick's run takes over (ticks before that return at once). Ten: one hand-over per
# 10 s keeps an idle drain's CPU near the old sweep's, and Flower still shows a run's
# report every 10 s.
DRAIN_RUN_INTERVALS = 10


@app.task(name="tasks.drain", bind=True, send_events=False)  # one a second would bury the recording tasks in Flower
def drain(self: Any) -> dict[str, Any]:
    """Store buffered frames as they arrive for a window, until the next run takes over
    (see `worker.store.drain`): one run per lane at a time, relayed without a gap."""
    settings = get_settings()
    keys = RedisKeys(settings.redis_prefix)
    client = redis_client()
    try:
        # The engine first: opening it the first time makes the schema, which may wait for
        # a locked database for longer than the lease lives before `held` starts renewing it.
        database = engine()
        lanes = drain_lanes(database, settings.drain_lanes)
        window = settings.drain_interval_seconds * DRAIN_RUN_INTERVALS
        shift = take_a_lane(client, keys, window, lanes, node=self.request.hostname, node_processes=node_processes())
        if shift is None:
            return {"skipped": "another drain run is storing" if lanes == 1 else "every drain lane has a run storing"}
        share = DrainLanes(client, keys, lanes, shift.lane)
        drainer = Drainer(client, keys, database, settings.drain_batch_size, share)
        with shift.held():
            report = drainer.drain_window(shift.keep_going(shutting_down), settings.flush_interval_ms / 1000)
    except SQLAlchemyError as error:
        # Recorded for `status`, shown in Flower, and re-raised for the log; the next run
        # that stores clears it.
        record_storage_error(redis_client(), keys, error)
        _show_failure_in_flower(self, error)
        raise
    clear_storage_error(client, keys)
    return {**report.as_dict(), "lane": shift.lane}


def _show_failure_in_flower(task: Any, error: Exception) -> None:
    """The drain sends no task events (a row a second would bury the recording tasks),
    so a run that cannot store sends its own task-failed event: the failures, and only
    they, show in Flower. Informative: an event that cannot be sent is skipped."""
    with contextlib.suppress(Exception):
        task.send_event("task-failed", retry=False, name=task.name, exception=f"{type(error).__name__}: {error}")


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


@app.task(name="tasks.follow_listings")
def follow_listings_task() -> dict[str, Any]:
    """Follow the listing of every market with a market subscription or subscribed
    futures contracts (worker/exchange/listings.py) and start the groups it made."""
    settings = get_settings()
    client = redis_client()
    keys = RedisKeys(settings.redis_prefix)
    registry = GroupRegistry(client, keys)
    with registry.changing():
        report = follow_listings(
            registry,
            ListingWatch(client, keys),
            engine(),
            lambda market: BinanceRest.from_settings(settings, client, market),
            settings.max_streams_per_connection,
            now_ms(),
        )
        for group in report.new_groups:
            start_group(group)
    return {"changes": [vars(change) for change in report.changes], "new_groups": [g.id for g in report.new_groups]}
