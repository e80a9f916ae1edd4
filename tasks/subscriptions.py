"""Subscribing, unsubscribing, and the long-running task that records one group."""

from __future__ import annotations

from typing import Any

from tasks.resources import redis_client
from tasks.workers import stream_processes
from worker import app
from worker.exchange.listings import TRADING
from worker.exchange.subscribing import subscribe_symbols, subscribe_whole_market
from worker.groups import (
    Group,
    GroupRegistry,
    default_kinds,
    is_whole_market,
    normalize_market,
    normalize_stream_kinds,
    split_unsubscribe,
)
from worker.ingest.runner import SHUTTING_DOWN, GroupRunner
from worker.keys import RedisKeys
from worker.ops.status import recording_figures
from worker.settings import get_settings
from worker.shutdown import shutting_down
from worker.streams import SPOT


def _registry() -> GroupRegistry:
    return GroupRegistry(redis_client(), RedisKeys(get_settings().redis_prefix))


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
def subscribe(
    symbols: list[str],
    streams: list[str] | None = None,
    market: str = SPOT,
    quote_assets: list[str] | None = None,
    statuses: list[str] | None = None,
) -> dict[str, Any]:
    """Record `streams` (default: settings) of `symbols` on `market` (`spot`, `usdm`,
    `coinm`); returns the groups that do. `["*"]` subscribes the market: every symbol
    its exchangeInfo lists with one of `statuses` (default TRADING), narrowed to
    `quote_assets`, followed as the listing changes (worker/exchange/subscribing.py).

    Types and shapes are checked first (InvalidSubscription names the bad element), then
    the symbols against the market's exchangeInfo before anything is recorded, so a
    typo fails here with Binance's message instead of becoming a silent, empty stream.
    A futures contract that no longer trades (settling, delivered) is refused: it
    streams nothing.
    """
    settings = get_settings()
    market = normalize_market(market)
    kinds = normalize_stream_kinds(
        default_kinds(settings.default_stream_kinds, market) if streams is None else streams, market
    )
    processes = stream_processes().total()
    if is_whole_market(symbols, quote_assets, statuses):
        filters = (quote_assets or [], statuses or [TRADING])
        return subscribe_whole_market(settings, redis_client(), market, kinds, *filters, start_group, processes)
    return subscribe_symbols(settings, redis_client(), market, symbols, kinds, start_group, processes)


@app.task(name="tasks.unsubscribe")
def unsubscribe(symbols: list[str], market: str = SPOT) -> dict[str, Any]:
    """Stop recording `symbols` on `market`, and all-market streams such as
    `!miniTicker@arr` named among them. A group that also holds other streams keeps
    them: its task unsubscribes the removed ones on the open connection, so the others
    lose nothing; a group left empty stops. `["*"]` stops the market altogether: its
    market subscription (the listing follower lets it be) and every group of it."""
    market = normalize_market(market)
    registry = _registry()
    if is_whole_market(symbols, None, None):
        with registry.changing():
            return {"market": market, "stopped": registry.remove_market(market), "shrunk": []}
    listed, market_wide = split_unsubscribe(symbols, market)
    with registry.changing():
        stopped, shrunk = registry.remove_symbols(listed, market_wide, market)
    return {"market": market, "stopped": stopped, "shrunk": shrunk}


@app.task(name="tasks.stream_group", bind=True)
def stream_group(self: Any, group_id: str) -> dict[str, str]:
    """Hold the group's websocket until it is unsubscribed (runs on queue `streams`)."""
    settings = get_settings()
    client = redis_client()
    keys = RedisKeys(settings.redis_prefix)
    client.delete(keys.starting(group_id))
    group = _registry().get(group_id)
    if group is None:
        return {"group": group_id, "ended": "not wanted"}

    def report_progress(current: Group, progress: dict[str, object]) -> None:
        # The PROGRESS state is what `AsyncResult.info` returns. Flower knows a task
        # only from events, and shows and serves (/api/tasks) a fixed set of a task's
        # fields: the figures go in `result`, the one of them meant for a task's output.
        progress = recording_figures(client, keys, current, progress, settings.stale_stream_seconds)
        self.update_state(state="PROGRESS", meta=progress)
        # retry=False: a report during a Redis outage fails at once and is skipped.
        self.send_event("task-progress", retry=False, result=progress, **progress)

    reason = GroupRunner(group, settings, client, shutting_down, report_progress).run(self.request.id)
    if reason == SHUTTING_DOWN:
        # Hand the group to the next streams worker now rather than at the next supervise.
        start_group(group)
    return {"group": group_id, "ended": reason}
