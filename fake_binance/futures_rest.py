"""The futures REST APIs: /fapi/v1 (USDⓈ-M) and /dapi/v1 (COIN-M).

They serve `rest`'s shared endpoints (ping, time, depth, klines, aggTrades) by the
futures rules (snapshots of at most 1,000 levels with `E` and `T`, up to 1,500 klines,
aggTrades of the last 48 hours only), plus what only futures have: exchangeInfo with
contract terms and status (COIN-M says `contractStatus`), openInterest, fundingRate
history and premiumIndex. Both markets charge one gate: Binance's 2,400 weight a minute
shared by /fapi and /dapi.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from fake_binance.context import CONTEXT
from fake_binance.contracts import COINM, ONBOARD_MS, Contract
from fake_binance.futures import COINM_CONTRACT_USD, FuturesVenue
from fake_binance.hub import now_ms
from fake_binance.rest import Endpoint, RestRules, rate_limits, symbol_index
from worker.replay.binance_api import json_response, limit_param, optional_int, weight_by_limit

VENUE = web.AppKey("futures_venue", FuturesVenue)
_FUNDING_DEFAULT_LIMIT = 100
_FUNDING_MAX_LIMIT = 1000
_KLINE_MAX = 1500
_HISTORY_MS = 48 * 3_600_000


def _kline_limit(request: web.Request) -> int:
    return limit_param(request, most=_KLINE_MAX)


def rules(prefix: str) -> RestRules:
    """The futures rules of /fapi/v1 or /dapi/v1 (their documented tables are alike)."""
    return RestRules(
        prefix=prefix,
        depth_default=500,
        depth_max=1000,
        depth_weights=((50, 2), (100, 5), (500, 10), (1000, 20)),
        depth_times=True,
        kline_max=_KLINE_MAX,
        second_klines=False,
        kline_weight=weight_by_limit(((99, 1), (499, 2), (1000, 5), (_KLINE_MAX, 10)), _kline_limit, 500),
        agg_trades_weight=20,
        agg_trade_best_match=False,
        history_ms=_HISTORY_MS,
    )


async def exchange_info(request: web.Request) -> web.Response:
    ctx, venue, now = request.app[CONTEXT], request.app[VENUE], now_ms()
    symbols = [_contract_info(venue, ctx.market.index(s), now) for s in venue.symbols(now)]
    futures_type = {"futuresType": "U_MARGINED"} if venue.name != COINM else {}
    return json_response(
        {
            "timezone": "UTC",
            "serverTime": now,
            **futures_type,
            "rateLimits": rate_limits(ctx)[:1]
            + [
                {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200},
                {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 300},
            ],
            "exchangeFilters": [],
            "symbols": symbols,
        }
    )


def _contract_info(venue: FuturesVenue, index: int, now: int) -> dict[str, Any]:
    c = venue.contract(index)
    status = venue.status(c, now)
    coinm = c.market == COINM
    return {
        "symbol": c.symbol,
        "pair": c.pair,
        "contractType": c.contract_type,
        "deliveryDate": c.delivery_ms,
        "onboardDate": ONBOARD_MS,
        **({"contractStatus": status, "contractSize": COINM_CONTRACT_USD} if coinm else {"status": status}),
        "maintMarginPercent": "2.5000",
        "requiredMarginPercent": "5.0000",
        "baseAsset": c.base_asset,
        "quoteAsset": c.quote_asset,
        "marginAsset": c.base_asset if coinm else c.quote_asset,
        "pricePrecision": 8,
        "quantityPrecision": 0 if coinm else 3,
        "baseAssetPrecision": 8,
        "quotePrecision": 8,
        "underlyingType": "COIN",
        "underlyingSubType": [],
        "triggerProtect": "0.0500",
        "liquidationFee": "0.012500",
        "marketTakeBound": "0.05",
        "filters": [],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
    }


async def open_interest(request: web.Request) -> web.Response:
    ctx, venue, now = request.app[CONTEXT], request.app[VENUE], now_ms()
    symbol, index = symbol_index(request)
    c = venue.contract(index)
    amount = venue.open_interest(index, max(ctx.market.last_n(now), 0))
    if c.market == COINM:
        return json_response(_coinm_open_interest(c, amount, now))
    return json_response({"openInterest": amount, "symbol": symbol, "time": now})


def _coinm_open_interest(c: Contract, amount: str, now: int) -> dict[str, Any]:
    return {"symbol": c.symbol, "pair": c.pair, "openInterest": amount, "contractType": c.contract_type, "time": now}


async def funding_rate(request: web.Request) -> web.Response:
    """Past fundings of a perpetual, oldest first: from `startTime`, else the latest `limit`."""
    venue, now = request.app[VENUE], now_ms()
    _, index = symbol_index(request)
    start, end = optional_int(request, "startTime"), optional_int(request, "endTime")
    limit = limit_param(request, _FUNDING_DEFAULT_LIMIT, _FUNDING_MAX_LIMIT)
    c = venue.contract(index)
    if c.funding_hours is None:
        return json_response([])
    period = c.funding_hours * 3_600_000
    last = min(now, end if end is not None else now) // period * period
    if start is not None:
        first = -(-start // period) * period
        times = range(first, min(last, first + (limit - 1) * period) + 1, period)
    else:
        times = range(max(last - (limit - 1) * period, 0), last + 1, period)
    return json_response([venue.funding_history(index, t) for t in times])


async def premium_index(request: web.Request) -> web.Response:
    """Mark price, index and funding of one contract or (no `symbol`) all of the market's.

    /fapi answers one symbol with an object; /dapi always with a list.
    """
    ctx, venue, now = request.app[CONTEXT], request.app[VENUE], now_ms()
    if "symbol" in request.query:
        _, index = symbol_index(request)
        entry = venue.premium_index(index, now)
        return json_response([entry] if venue.name == COINM else entry)
    return json_response([venue.premium_index(ctx.market.index(s), now) for s in venue.symbols(now)])


def _premium_index_weight(request: web.Request) -> int:
    return 1 if "symbol" in request.query else 10


ENDPOINTS: list[Endpoint] = [
    ("/exchangeInfo", exchange_info, 1),
    ("/openInterest", open_interest, 1),
    ("/fundingRate", funding_rate, 1),
    ("/premiumIndex", premium_index, _premium_index_weight),
]
