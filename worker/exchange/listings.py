"""Futures contracts that stop trading: noticed, recorded, and no longer subscribed.

A delivery contract settles (`TRADING` -> `DELIVERING`, then it leaves exchangeInfo); a
delisted perpetual becomes `SETTLING` and stays listed. Either way Binance keeps the
connection and the subscription and sends nothing more, which is indistinguishable
from a quiet market on the socket. So beat asks each futures market's exchangeInfo
(weight 1, one request per market) for the status of the contracts subscribed there;
a contract whose status changed gets a row in `listing_changes`, and one that no
longer trades is unsubscribed (its group stops or shrinks, as after `unsubscribe`).

Nothing here assumes a funding interval: what a perpetual's funding does is in its
mark-price stream (`T`), recorded as Binance sends it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine

from worker.exchange.rest import BinanceRest
from worker.groups import GroupRegistry, InvalidSubscription
from worker.keys import RedisKeys, as_text
from worker.store.storage import insert_or_ignore, listing_changes
from worker.streams import FUTURES_MARKETS, SPOT, USDM

TRADING = "TRADING"
GONE = "DELISTED"
"""The status recorded for a contract that left exchangeInfo (a delivered contract)."""


@dataclass(frozen=True)
class ListingChange:
    symbol: str
    market: str
    changed_at: int
    old_status: str | None
    new_status: str

    @property
    def stopped(self) -> bool:
        """Whether the change ends the contract's trading (and its recording)."""
        return self.new_status != TRADING


class ListingWatch:
    """The status each subscribed futures contract had when last looked at (Redis)."""

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
    """The symbols' listing statuses from the market's exchangeInfo; unknown symbols
    raise with Binance's message, and on futures a contract that does not trade is
    refused and the others' statuses noted for the listing check."""
    statuses = rest.symbol_statuses(symbols)
    if market != SPOT:
        refuse_untradable(statuses, market)
        watch.note(market, statuses)
    return statuses


def check_listings(
    registry: GroupRegistry, watch: ListingWatch, engine: Engine, rest_of: Callable[[str], BinanceRest], now: int
) -> list[ListingChange]:
    """Compare the subscribed futures contracts' statuses with exchangeInfo's (see
    `apply_statuses`). Markets with nothing subscribed cost no request."""
    changes: list[ListingChange] = []
    for market in FUTURES_MARKETS:
        symbols = registry.contracts(market.name)
        if symbols:
            listing = rest_of(market.name).listing()
            statuses = {symbol: listing.get(symbol, GONE) for symbol in symbols}
            changes += apply_statuses(registry, watch, engine, market.name, statuses, now)
    return changes


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
    registry: GroupRegistry, watch: ListingWatch, engine: Engine, market: str, statuses: Mapping[str, str], now: int
) -> list[ListingChange]:
    """Compare contracts' statuses with those last seen; record every change in
    `listing_changes` and unsubscribe the contracts that stopped trading."""
    known = watch.known(market)
    changes = []
    for symbol, status in statuses.items():
        before = known.get(symbol)
        if before != status:
            watch.note(market, {symbol: status})
            if before is not None or status != TRADING:  # not a first look at a trading contract
                changes.append(ListingChange(symbol, market, now, before, status))
    if changes:
        with engine.begin() as conn:
            conn.execute(insert_or_ignore(conn.dialect.name, listing_changes), [vars(change) for change in changes])
    ended = [c.symbol for c in changes if c.stopped]
    if ended:
        registry.remove_symbols(ended, market=market)
        watch.forget(market, ended)
    return changes


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
