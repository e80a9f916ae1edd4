"""Subscribing, unsubscribing, and the long-running task that records one group."""

from __future__ import annotations

from typing import Any

from redis.lock import Lock

from tasks.resources import redis_client
from worker import app
from worker.exchange.rest import BinanceRest
from worker.groups import Group, GroupRegistry, normalize_symbols, plan_groups, stream_names
from worker.ingest.runner import SHUTTING_DOWN, GroupRunner
from worker.keys import RedisKeys
from worker.settings import get_settings
from worker.shutdown import shutting_down
from worker.streams import ALL_MARKET_STREAMS, validate_stream_kind

SUBSCRIPTIONS_LOCK_SECONDS = 30


def _registry() -> GroupRegistry:
    return GroupRegistry(redis_client(), RedisKeys(get_settings().redis_prefix))


def _changing_subscriptions() -> Lock:
    return redis_client().lock(
        RedisKeys(get_settings().redis_prefix).subscriptions_lock,
        timeout=SUBSCRIPTIONS_LOCK_SECONDS,
        blocking_timeout=SUBSCRIPTIONS_LOCK_SECONDS,
    )


def start_group(group: Group) -> bool:
    """Queue the group's recording task, unless a start is already on its way.

    The marker expires after a supervise interval or two, so a start that was lost
    (a worker killed before it took the message) is retried by the supervisor.
    """
    settings = get_settings()
    keys = RedisKeys(settings.redis_prefix)
    marker_ttl = max(1, int(settings.supervise_interval_seconds * 2))
    if not redis_client().set(keys.starting(group.id), 1, nx=True, ex=marker_ttl):
        return False
    stream_group.delay(group.id)
    return True


@app.task(name="tasks.subscribe")
def subscribe(symbols: list[str], streams: list[str] | None = None) -> dict[str, Any]:
    """Record `streams` (default: settings) of `symbols`; returns the groups that do.

    Symbols are checked against Binance before anything is recorded, so a typo fails
    here with Binance's message instead of becoming a silent, empty stream.
    """
    settings = get_settings()
    symbols = normalize_symbols(symbols)
    kinds = [validate_stream_kind(kind) for kind in (streams or settings.default_stream_kinds)]
    statuses = BinanceRest.from_settings(settings, redis_client()).symbol_statuses(symbols)
    registry = _registry()
    requested = stream_names(symbols, kinds)
    with _changing_subscriptions():
        covered = registry.covered_streams()
        new_groups = plan_groups([s for s in requested if s not in covered], settings.max_streams_per_connection)
        for group in new_groups:
            registry.want(group)
            start_group(group)
    requested_set = set(requested)
    covering = [g for g in registry.wanted().values() if requested_set & set(g.streams)]
    return {
        "symbols": statuses,
        "streams": requested,
        "groups": sorted(g.id for g in covering),
        "new_groups": [g.id for g in new_groups],
    }


@app.task(name="tasks.unsubscribe")
def unsubscribe(symbols: list[str]) -> dict[str, Any]:
    """Stop recording `symbols` (an all-market stream such as `!miniTicker@arr` by its
    name). Groups that also hold other symbols are replaced by a group of the remaining
    streams, so those keep being recorded."""
    settings = get_settings()
    market_wide = [s for s in symbols if s in ALL_MARKET_STREAMS]
    named = [s for s in symbols if s not in market_wide]
    lowered = {s.lower() for s in normalize_symbols(named)} if named or not market_wide else set()
    registry = _registry()
    stopped, replacements = [], []
    with _changing_subscriptions():
        for group in registry.wanted().values():
            keep = [s for s in group.streams if s.split("@", 1)[0] not in lowered and s not in market_wide]
            if len(keep) == len(group.streams):
                continue
            registry.unwant(group.id)
            stopped.append(group.id)
            for replacement in plan_groups(keep, settings.max_streams_per_connection):
                registry.want(replacement)
                start_group(replacement)
                replacements.append(replacement.id)
    return {"stopped": stopped, "replaced_by": replacements}


@app.task(name="tasks.stream_group", bind=True)
def stream_group(self: Any, group_id: str) -> dict[str, str]:
    """Hold the group's websocket until it is unsubscribed (runs on queue `streams`)."""
    settings = get_settings()
    client = redis_client()
    client.delete(RedisKeys(settings.redis_prefix).starting(group_id))
    group = _registry().get(group_id)
    if group is None:
        return {"group": group_id, "ended": "not wanted"}

    def report_progress(progress: dict[str, object]) -> None:
        # The PROGRESS state is what `AsyncResult.info` returns; the event is what
        # Flower shows on the task's page while it runs.
        self.update_state(state="PROGRESS", meta=progress)
        self.send_event("task-progress", **progress)

    reason = GroupRunner(group, settings, client, shutting_down, report_progress).run(self.request.id)
    if reason == SHUTTING_DOWN:
        # Hand the group to the next streams worker now rather than at the next supervise.
        start_group(group)
    return {"group": group_id, "ended": reason}
