"""Following Binance's listing: symbols that start and stop trading, noticed and recorded.

A spot symbol halts (`BREAK`, `HALT`) or is delisted (it leaves exchangeInfo); a futures
delivery contract settles (`TRADING` -> `DELIVERING`, then it leaves exchangeInfo) and a
delisted perpetual becomes `SETTLING` and stays listed. Either way Binance keeps the
connection and the subscription and sends nothing more, which is indistinguishable
from a quiet market on the socket. So beat reads the exchangeInfo of each market that
has something to follow (one request per market, every LISTING_REFRESH_SECONDS): a
symbol whose status changed gets a row in `listing_changes`, one that no longer trades
is unsubscribed (its group stops or shrinks, as after `unsubscribe`), and for a market
subscription (`subscribe --all`) a new listing is added to the groups with room (their
connections subscribe it live) or to a new group. Groups that did not change keep
their connection. The first read of each UTC day is kept in `exchange_info_snapshots`
for a replay to serve the listing of that day.

Nothing here assumes a funding interval: what a perpetual's funding does is in its
mark-price stream (`T`), recorded as Binance sends it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine

from worker.exchange.rest import BinanceRest, Listed, listed
from worker.groups import Group, GroupRegistry, InvalidSubscription, MarketSubscription, stream_names
from worker.keys import RedisKeys, as_text
from worker.store.storage import exchange_info_snapshots, insert_or_ignore, listing_changes
from worker.streams import MARKETS, SPOT, USDM
from worker.times import utc_datetime

TRADING = "TRADING"
GONE = "DELISTED"
"""The status recorded for a symbol that left exchangeInfo (delisted, or a delivered contract)."""
KNOWN_STATUSES = frozenset(
    {
        # spot
        "PRE_TRADING", TRADING, "POST_TRADING", "END_OF_DAY", "HALT", "AUCTION_MATCH", "BREAK",
        # futures
        "PENDING_TRADING", "PRE_DELIVERING", "DELIVERING", "DELIVERED", "PRE_SETTLE", "SETTLING", "CLOSE",
    }
)  # fmt: skip
"""exchangeInfo's symbol statuses (binance-protocol.md), which a market subscription may name."""


@dataclass(frozen=True)
class ListingChange:
    symbol: str
    market: str
    changed_at: int
    old_status: str | None
    new_status: str


@dataclass
class ListingReport:
    """What a listing refresh did: the changes it recorded and the groups it made,
    which the caller starts."""

    changes: list[ListingChange] = field(default_factory=list)
    new_groups: list[Group] = field(default_factory=list)


class ListingWatch:
    """The status each followed symbol had when last looked at (Redis)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    def note(self, market: str, statuses: Mapping[str, str]) -> None:
        if statuses:
            mapping: dict[Any, Any] = dict(statuses)  # redis-py's key type is a union a str dict does not match
            self.client.hset(self.keys.listing_statuses(market), mapping=mapping)

    def known(self, market: str) -> dict[str, str]:
        raw = self.client.hgetall(self.keys.listing_statuses(market))
        return {as_text(symbol): as_text(status) for symbol, status in raw.items()}

    def forget(self, market: str, symbols: list[str]) -> None:
        if symbols:
            self.client.hdel(self.keys.listing_statuses(market), *symbols)


def refuse_untradable(statuses: Mapping[str, str], market: str) -> None:
    """InvalidSubscription for futures contracts that do not trade: they would stream nothing."""
    untradable = {symbol: status for symbol, status in statuses.items() if status != TRADING}
    if untradable:
        named = ", ".join(f"{symbol} is {status}" for symbol, status in untradable.items())
        raise InvalidSubscription(
            f"{named} on {market}, not {TRADING}: a contract that settles or is delisted streams nothing; "
            "subscribe a trading contract (the perpetual, or the next quarter's)"
        )


def check_pairs(rest: BinanceRest, pairs: list[str], market: str) -> None:
    """InvalidSubscription unless every name is a pair of the market's exchangeInfo:
    pair kinds (`indexPrice`, `continuousKline_<i>`) are named by a pair, not a contract."""
    known = rest.pairs()
    unknown = [pair for pair in pairs if pair not in known]
    if unknown:
        raise InvalidSubscription(
            f"unknown pair {', '.join(unknown)} on {market}: pair kinds (continuousKline, indexPrice, "
            f"indexPriceKline) take a pair such as {', '.join(sorted(known)[:3])}, not a contract"
        )


def check_subscribable(rest: BinanceRest, watch: ListingWatch, symbols: list[str], market: str) -> dict[str, str]:
    """The symbols' listing statuses from the market's exchangeInfo, noted for the
    listing refresh; unknown symbols raise with Binance's message, and on futures a
    contract that does not trade is refused."""
    statuses = rest.symbol_statuses(symbols)
    if market != SPOT:
        refuse_untradable(statuses, market)
    watch.note(market, statuses)
    return statuses


def market_subscription(
    market: str, kinds: Sequence[str], quote_assets: object, statuses: object
) -> MarketSubscription:
    """A market subscription from what a caller gave, checked for types and statuses
    (the quote assets are checked against the listing by `subscribe_market`)."""
    quotes = _upper_strings(quote_assets, "quote_assets", "['USDT']")
    wanted = _upper_strings(statuses, "statuses", "['TRADING']")
    unknown = [status for status in wanted if status not in KNOWN_STATUSES]
    if unknown or not wanted:
        raise InvalidSubscription(
            f"unknown status {', '.join(unknown) or '(none given)'}: statuses are exchangeInfo's, "
            f"such as {', '.join(sorted(KNOWN_STATUSES))}"
        )
    return MarketSubscription(market, tuple(kinds), tuple(quotes), tuple(wanted))


def _upper_strings(value: object, name: str, example: str) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise InvalidSubscription(f"{name} must be a list of strings such as {example}, got {value!r:.80}")
    return list(dict.fromkeys(item.strip().upper() for item in value))


def subscribe_market(
    registry: GroupRegistry,
    watch: ListingWatch,
    subscription: MarketSubscription,
    info: Mapping[str, Any],
    max_per_group: int,
) -> tuple[list[str], list[Group]]:
    """Record every symbol of `info` (the market's exchangeInfo) the subscription wants,
    keep the subscription for the listing refresh, and note the followed symbols'
    statuses as its baseline (a symbol that appears later is a listing): (symbols
    recorded, new groups to start). The caller holds the subscriptions lock."""
    listing = listed(info)
    _check_quote_assets(subscription, listing)
    followed = _followed(subscription, listing)
    watch.note(subscription.market, followed)
    registry.subscribe_market(subscription)
    symbols = _recorded(subscription, followed)
    _, new = registry.place(stream_names(symbols, subscription.kinds), max_per_group, subscription.market)
    return symbols, new


def _check_quote_assets(subscription: MarketSubscription, listing: Mapping[str, Listed]) -> None:
    quotes = {entry.quote_asset for entry in listing.values() if entry.quote_asset}
    unknown = [quote for quote in subscription.quote_assets if quote not in quotes]
    if unknown:
        raise InvalidSubscription(
            f"unknown quote asset {', '.join(unknown)} on {subscription.market}: its symbols are quoted in "
            f"{', '.join(sorted(quotes)[:20])}{' and more' if len(quotes) > 20 else ''}"
        )


def _followed(subscription: MarketSubscription, listing: Mapping[str, Listed]) -> dict[str, str]:
    """Status of every listed symbol of the subscription's quote assets, whatever its status."""
    return {symbol: entry.status for symbol, entry in listing.items() if subscription.follows(entry.quote_asset)}


def _recorded(subscription: MarketSubscription, followed: Mapping[str, str]) -> list[str]:
    return sorted(symbol for symbol, status in followed.items() if status in subscription.statuses)


def follow_listings(
    registry: GroupRegistry,
    watch: ListingWatch,
    engine: Engine,
    rest_of: Callable[[str], BinanceRest],
    max_per_group: int,
    now: int,
) -> ListingReport:
    """Read the exchangeInfo of every market with a market subscription or subscribed
    futures contracts (no request for the others), keep the day's first answer, and
    bring the market's groups in step with it (`follow_market`). The caller holds the
    subscriptions lock and starts the new groups."""
    report = ListingReport()
    subscriptions = registry.market_subscriptions()
    for market in MARKETS:
        subscription = subscriptions.get(market)
        subscribed = registry.contracts(market)
        if subscription is None and not subscribed:
            continue
        info = rest_of(market).exchange_info()
        keep_daily_snapshot(engine, market, info, now)
        listing = listed(info)
        done = follow_market(registry, watch, engine, market, listing, subscription, subscribed, max_per_group, now)
        report.changes += done.changes
        report.new_groups += done.new_groups
    return report


def follow_market(
    registry: GroupRegistry,
    watch: ListingWatch,
    engine: Engine,
    market: str,
    listing: Mapping[str, Listed],
    subscription: MarketSubscription | None,
    subscribed: Sequence[str],
    max_per_group: int,
    now: int,
) -> ListingReport:
    """Compare the statuses of the `subscribed` symbols, and of every symbol a market
    subscription follows, with those last seen (see `apply_statuses`), then add the
    symbols the subscription wants that no group records yet (a listing, a symbol
    trading again) to the groups with room or to new ones."""
    statuses = {symbol: listing[symbol].status if symbol in listing else GONE for symbol in subscribed}
    followed: dict[str, str] = {}
    if subscription is not None:
        followed = _followed(subscription, listing)
        gone = {symbol: GONE for symbol in watch.known(market) if symbol not in listing}
        statuses |= followed | gone
    recorded = subscription.statuses if subscription else (TRADING,)
    report = ListingReport(apply_statuses(registry, watch, engine, market, statuses, now, recorded, followed))
    if subscription is not None:
        streams = stream_names(_recorded(subscription, followed), subscription.kinds)
        report.new_groups = registry.place(streams, max_per_group, market)[1]
    return report


def apply_contract_info(
    registry: GroupRegistry, watch: ListingWatch, engine: Engine, rows: Sequence[Sequence[Any]], now: int
) -> list[ListingChange]:
    """The statuses USDⓈ-M's `!contractInfo` pushed (`usdm_contract_info` rows, as the
    drain stores them), applied to the subscribed contracts at once instead of at the
    next exchangeInfo poll: a contract that stopped trading stops being recorded."""
    subscribed = set(registry.contracts(USDM))
    latest = {row[0]: row[6] for row in sorted(rows, key=lambda row: row[1]) if row[0] in subscribed}
    return apply_statuses(registry, watch, engine, USDM, latest, now) if latest else []


def apply_statuses(
    registry: GroupRegistry,
    watch: ListingWatch,
    engine: Engine,
    market: str,
    statuses: Mapping[str, str],
    now: int,
    recorded: Collection[str] = (TRADING,),
    followed: Collection[str] = (),
) -> list[ListingChange]:
    """Compare symbols' statuses with those last seen; record every change in
    `listing_changes` and unsubscribe the symbols whose new status is not `recorded`.

    A first look at a trading symbol is no change (it was subscribed before statuses
    were noted), unless it is one of `followed`: symbols a market subscription follows,
    whose statuses were noted when it was made, so a new one is a listing. A stopped
    symbol is forgotten unless a market subscription still follows it (halted: it may
    trade again)."""
    known = watch.known(market)
    changes = []
    for symbol, status in statuses.items():
        before = known.get(symbol)
        if before != status:
            watch.note(market, {symbol: status})
            if before is not None or status != TRADING or symbol in followed:
                changes.append(ListingChange(symbol, market, now, before, status))
    if changes:
        with engine.begin() as conn:
            conn.execute(insert_or_ignore(conn.dialect.name, listing_changes), [vars(change) for change in changes])
    ended = [c.symbol for c in changes if c.new_status not in recorded]
    if ended:
        registry.remove_symbols(ended, market=market)
        watch.forget(market, [symbol for symbol in ended if symbol not in followed])
    return changes


def keep_daily_snapshot(engine: Engine, market: str, info: Mapping[str, Any], now: int) -> bool:
    """Store `info` as the market's exchangeInfo of the UTC day of `now`, unless that day
    has one already (the day's first read is kept); True when stored."""
    day = utc_datetime(now).strftime("%Y-%m-%d")
    table = exchange_info_snapshots
    with engine.connect() as conn:  # whether the day has one, without reading its body (150 KB for 202 symbols)
        if conn.execute(select(table.c.taken_at).where(table.c.market == market, table.c.day == day)).first():
            return False
    row = {"market": market, "day": day, "taken_at": now, "body": json.dumps(info, separators=(",", ":"))}
    with engine.begin() as conn:
        return bool(conn.execute(insert_or_ignore(conn.dialect.name, table), row).rowcount)


def exchange_info_on(engine: Engine, market: str, day: str) -> str | None:
    """The exchangeInfo body (JSON text) kept for `market` on `day` ('YYYY-MM-DD', UTC),
    or None when the follower did not read it that day: the listing of the day, for a replay."""
    table = exchange_info_snapshots
    with engine.connect() as conn:
        return conn.execute(select(table.c.body).where(table.c.market == market, table.c.day == day)).scalar()


def recent_listing_changes(engine: Engine, limit: int = 20) -> list[dict[str, object]]:
    """The latest changes, newest first, for `status`."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(listing_changes)
            .order_by(listing_changes.c.changed_at.desc(), listing_changes.c.id.desc())
            .limit(limit)
        ).mappings()
        return [
            {key: row[key] for key in ("symbol", "market", "changed_at", "old_status", "new_status")} for row in rows
        ]
