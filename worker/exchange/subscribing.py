"""Subscribing symbols, or a whole market, after checking them against exchangeInfo.

The Celery task (`tasks.subscribe`) is a thin wrapper around these: it passes the Redis
client, the settings, how to start a group's recording task, and how many streams
processes the workers have, so this module never imports a task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from worker.exchange.listings import (
    ListingWatch,
    check_pairs,
    check_subscribable,
    market_subscription,
    subscribe_market,
)
from worker.exchange.rest import BinanceRest
from worker.groups import Group, GroupRegistry, InvalidSubscription, normalize_symbols, stream_names
from worker.keys import RedisKeys
from worker.settings import Settings
from worker.streams import is_pair_kind

StartGroup = Callable[[Group], object]


def subscribe_symbols(
    settings: Settings,
    client: redis.Redis,
    market: str,
    symbols: object,
    kinds: list[str],
    start_group: StartGroup,
    processes: int | None,
) -> dict[str, Any]:
    """Check `symbols` (or pairs, for pair kinds) against the market's exchangeInfo,
    then place their streams in groups and start the new ones."""
    names = normalize_symbols(symbols)
    rest = BinanceRest.from_settings(settings, client, market)
    keys = RedisKeys(settings.redis_prefix)
    by_pair = [kind for kind in kinds if is_pair_kind(kind)]
    if by_pair:
        check_pairs(rest, names, market)
    listed = check_subscribable(rest, ListingWatch(client, keys), names, market) if len(by_pair) < len(kinds) else {}
    registry = GroupRegistry(client, keys)
    requested = stream_names(names, kinds)
    with registry.changing():
        _, new_groups = registry.place(requested, settings.max_streams_per_connection, market)
        for group in new_groups:
            start_group(group)
    return {
        "market": market,
        "symbols": listed,
        **({"pairs": names} if by_pair else {}),
        "streams": requested,
        "groups": registry.groups_recording(requested, market),
        "new_groups": [g.id for g in new_groups],
        **registry.note_waiting(processes, new_groups),
    }


def subscribe_whole_market(
    settings: Settings,
    client: redis.Redis,
    market: str,
    kinds: list[str],
    quote_assets: list[str],
    statuses: list[str],
    start_group: StartGroup,
    processes: int | None,
) -> dict[str, Any]:
    """Subscribe every symbol of the market's listing the filters keep, and keep the
    market subscription in Redis for the listing follower (`follow_listings`)."""
    if any(is_pair_kind(kind) for kind in kinds):
        raise InvalidSubscription("pair kinds (continuousKline, indexPrice...) take pairs: name them, not '*'")
    subscription = market_subscription(market, kinds, quote_assets, statuses)
    keys = RedisKeys(settings.redis_prefix)
    registry = GroupRegistry(client, keys)
    info = BinanceRest.from_settings(settings, client, market).exchange_info()
    with registry.changing():
        watch = ListingWatch(client, keys)
        symbols, new_groups = subscribe_market(registry, watch, subscription, info, settings.max_streams_per_connection)
        for group in new_groups:
            start_group(group)
    streams = stream_names(symbols, kinds)
    return {
        "market": market,
        "market_subscription": {"quote_assets": quote_assets, "statuses": list(subscription.statuses)},
        "symbol_count": len(symbols),
        "stream_count": len(streams),
        "groups": registry.groups_recording(streams, market),
        "new_groups": [g.id for g in new_groups],
        **registry.note_waiting(processes, new_groups),
    }
