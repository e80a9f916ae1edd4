"""Open interest of the subscribed futures symbols, polled from REST.

Binance streams no open interest: `GET /fapi/v1/openInterest` (`/dapi/v1/openInterest`)
answers the current figure of one symbol, weight 1, from the futures budget that both
markets share. Beat runs this every OPEN_INTEREST_INTERVAL_SECONDS; each answer is a
`<m>_open_interest` row keyed by (symbol, Binance's time), so a poll answered twice
with the same time is one row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy.engine import Engine

from worker.exchange.ratelimit import RestUnavailable
from worker.exchange.rest import BinanceError, BinanceRest, UnknownSymbol
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.settings import Settings
from worker.store.storage import store_rows
from worker.streams import FUTURES_MARKETS
from worker.times import now_ms

log = logging.getLogger(__name__)


def open_interest_row(answer: dict[str, Any], received_at: int) -> tuple[Any, ...]:
    """An openInterest answer as a `<m>_open_interest` row (COIN-M's extra fields are
    dropped); polled, not a frame: no place in a flush (`received_seq`)."""
    return (answer["symbol"], int(answer["time"]), float(answer["openInterest"]), received_at, None)


def poll_open_interest(
    settings: Settings,
    client: redis.Redis,
    database: Callable[[], Engine],
    rest_for: Callable[[str], BinanceRest],
) -> dict[str, Any]:
    """Poll every subscribed futures symbol once and store the answers; returns, per
    market, the symbols stored and those that failed (with why).

    `rest_for(market)` gives that market's client and `database()` the engine: both are
    only asked for when the market has subscribed symbols, so a spot-only recorder never
    builds a futures client nor touches the database here.
    """
    keys = RedisKeys(settings.redis_prefix)
    result: dict[str, Any] = {}
    for market in FUTURES_MARKETS:
        symbols = GroupRegistry(client, keys).contracts(market.name)
        if not symbols:
            continue
        rest, rows, failed = rest_for(market.name), [], {}
        for symbol in symbols:
            try:
                rows.append(open_interest_row(rest.open_interest(symbol), now_ms()))
            except (BinanceError, UnknownSymbol, RestUnavailable) as error:
                failed[symbol] = str(error)
                log.warning("open interest of %s %s failed: %s", market.name, symbol, error)
        if rows:
            with database().begin() as conn:
                store_rows(conn, {market.table_prefix + "open_interest": rows})
        result[market.name] = {"stored": [row[0] for row in rows], "failed": failed}
    return result
