"""The market-data REST endpoints, with Binance's parameters, rows and errors.

Spot's are under /api/v3; the futures markets serve the same handlers under /fapi/v1
and /dapi/v1 with their own `RestRules` (limits, weights, row fields), plus the
futures-only endpoints of `futures_rest`. A middleware does what every endpoint
shares: request weight (429/418, the `X-MBX-USED-WEIGHT-1M` header), the mapping of
`ApiError` to Binance's error body, and the REST counters of /fake/stats. Handlers
only read the market model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fake_binance import intervals
from fake_binance.context import CONTEXT, Context
from fake_binance.hub import now_ms
from fake_binance.market import Trade, UnknownSymbol, decimal_str
from fake_binance.orderbook import MAX_LEVELS
from fake_binance.streams import SpotVenue
from worker.replay.binance_api import (
    ApiError,
    Handler,
    WeightTable,
    error_response,
    json_response,
    limit_param,
    mandatory,
    optional_int,
    requested_symbols,
    symbol_info,
    truncated_limit,
    weight_by_limit,
)

_HOUR_MS = 3_600_000
Weight = int | Callable[[web.Request], int]


@dataclass(frozen=True)
class RestRules:
    """What differs between spot's REST API and a futures market's."""

    prefix: str  # "/api/v3", "/fapi/v1", "/dapi/v1"
    depth_default: int
    depth_max: int  # larger limits are answered with this many levels
    depth_weights: WeightTable
    depth_times: bool  # snapshots carry E (now) and T (the book's transaction time)
    kline_max: int
    second_klines: bool  # whether `1s` klines exist (spot only)
    kline_weight: Weight
    agg_trades_weight: int
    agg_trade_best_match: bool  # spot's aggTrades rows carry "M"
    history_ms: int | None  # how far back aggTrades reaches (None: to the epoch)


RULES = web.AppKey("rest_rules", RestRules)
WEIGHTS = web.AppKey("rest_weights", dict)
"""Handler -> its weight, for the endpoints of the application the key is on."""


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    weight = request.app.get(WEIGHTS, {}).get(request.match_info.handler)
    # A parent application's middleware sees its sub-applications' requests too: only
    # the application that owns the endpoint counts it.
    if weight is None or request.match_info.apps[-1] is not request.app:
        return await handler(request)
    ctx = request.app[CONTEXT]
    now = now_ms()
    rejection = ctx.gate.admit(weight if isinstance(weight, int) else weight(request), now)
    if rejection is not None:
        response: web.StreamResponse = error_response(rejection.code, rejection.msg, rejection.status)
        response.headers["Retry-After"] = str(rejection.retry_after)
    else:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.code, exc.msg, 400)
    response.headers["X-MBX-USED-WEIGHT-1M"] = str(ctx.gate.used(now))
    ctx.stats.record_rest(response.status)
    return response


# -- parameters -----------------------------------------------------------------


def symbol_index(request: web.Request) -> tuple[str, int]:
    """The `symbol` parameter and its position in the market model; -1121 if unlisted."""
    symbol = mandatory(request, "symbol")
    ctx = request.app[CONTEXT]
    try:
        if not ctx.venue.knows(symbol, now_ms()):
            raise UnknownSymbol(symbol)
        return symbol, ctx.market.index(symbol)
    except UnknownSymbol:
        raise ApiError(-1121, "Invalid symbol.") from None


def _depth_limit(request: web.Request) -> int:
    """Above the market's most levels the answer is truncated to them, as Binance documents."""
    rules = request.app[RULES]
    return truncated_limit(request, rules.depth_default, rules.depth_max)


def _depth_weight(request: web.Request) -> int:
    rules = request.app[RULES]
    return weight_by_limit(rules.depth_weights, _depth_limit, rules.depth_default)(request)


# -- endpoints ------------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    return json_response({})


async def server_time(request: web.Request) -> web.Response:
    return json_response({"serverTime": now_ms()})


async def exchange_info(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    wanted = requested_symbols(request) or ctx.venue.symbols(now_ms())
    if any(not ctx.venue.knows(s, now_ms()) for s in wanted):
        raise ApiError(-1121, "Invalid symbol.")
    return json_response(
        {
            "timezone": "UTC",
            "serverTime": now_ms(),
            "rateLimits": rate_limits(ctx),
            "exchangeFilters": [],
            "symbols": [symbol_info(s, _spot_status(ctx, s)) for s in wanted],
        }
    )


def rate_limits(ctx: Context) -> list[dict[str, Any]]:
    return [
        {
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": "MINUTE",
            "intervalNum": 1,
            "limit": ctx.gate.limit,
        },
        {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
        {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
        {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
    ]


def _spot_status(ctx: Context, symbol: str) -> str:
    """A listed spot symbol's status (spot's venue keeps it: control can change it)."""
    return ctx.venue.status(symbol) if isinstance(ctx.venue, SpotVenue) else "TRADING"


async def klines(request: web.Request) -> web.Response:
    """Ascending klines by open time; only windows that have opened, from genesis on."""
    ctx, rules = request.app[CONTEXT], request.app[RULES]
    _, index = symbol_index(request)
    interval = mandatory(request, "interval")
    if interval not in intervals.INTERVALS or (interval == "1s" and not rules.second_klines):
        raise ApiError(-1120, "Invalid interval.")
    start, end, limit = (
        optional_int(request, "startTime"),
        optional_int(request, "endTime"),
        limit_param(request, most=rules.kline_max),
    )
    now = now_ms()
    last_open = intervals.window_start(interval, min(end if end is not None else now, now))
    first_open = intervals.window_start(interval, ctx.market.clock.genesis_ms)
    opens = _window_opens(interval, first_open, last_open, start, limit)
    rows = []
    for open_ms in opens:
        k = ctx.market.kline(index, interval, open_ms, now)
        s = k.stats
        rows.append(
            [
                k.open_ms,
                decimal_str(s.open),
                decimal_str(s.high),
                decimal_str(s.low),
                decimal_str(s.close),
                decimal_str(s.volume),
                k.close_ms,
                decimal_str(s.quote_volume),
                s.count,
                decimal_str(s.taker_buy_volume),
                decimal_str(s.taker_buy_quote_volume),
                "0",
            ]
        )
    return json_response(rows)


def _window_opens(interval: str, first_open: int, last_open: int, start: int | None, limit: int) -> list[int]:
    """Up to `limit` open times in [first_open, last_open]: from `start` if given
    (the first window opening at or after it), else the most recent ones."""
    opens: list[int] = []
    if start is not None:
        open_ms = intervals.window_start(interval, start)
        open_ms = open_ms if open_ms >= start else intervals.next_start(interval, open_ms)
        open_ms = max(open_ms, first_open)
        while open_ms <= last_open and len(opens) < limit:
            opens.append(open_ms)
            open_ms = intervals.next_start(interval, open_ms)
        return opens
    open_ms = last_open
    while open_ms >= first_open and len(opens) < limit:
        opens.append(open_ms)
        open_ms = intervals.previous_start(interval, open_ms)
    return opens[::-1]


async def agg_trades(request: web.Request) -> web.Response:
    ctx, rules = request.app[CONTEXT], request.app[RULES]
    _, index = symbol_index(request)
    from_id = optional_int(request, "fromId")
    start, end, limit = (
        optional_int(request, "startTime"),
        optional_int(request, "endTime"),
        limit_param(request),
    )
    clock, now = ctx.market.clock, now_ms()
    last = clock.last_at(now)
    # Futures serve only recent history: older trades are not there to page through.
    oldest = 0 if rules.history_ms is None else clock.first_at_or_after(now - rules.history_ms)
    if from_id is not None:
        numbers = _from(max(from_id - ctx.market.agg_id_base(index), oldest), last, limit)
    elif start is not None:
        if end is not None and end - start > _HOUR_MS:
            raise ApiError(-1127, "More than 1 hours between startTime and endTime.")
        upto = last if end is None else min(last, clock.last_at(end))
        numbers = range(max(clock.first_at_or_after(start), oldest), upto + 1)[:limit]
    else:
        numbers = _recent(last if end is None else min(last, clock.last_at(end)), limit)
        numbers = range(max(numbers.start, oldest), numbers.stop)
    best_match = rules.agg_trade_best_match
    return json_response([_agg_row(ctx.market.trade(index, n), best_match) for n in numbers])


async def historical_trades(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    _, index = symbol_index(request)
    from_id, limit = optional_int(request, "fromId"), limit_param(request)
    last = ctx.market.last_n(now_ms())
    if from_id is None:
        numbers = _recent(last, limit)
    else:
        numbers = _from(from_id - ctx.market.trade_id_base(index), last, limit)
    return json_response([_trade_row(ctx.market.trade(index, n)) for n in numbers])


async def recent_trades(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    _, index = symbol_index(request)
    numbers = _recent(ctx.market.last_n(now_ms()), limit_param(request))
    return json_response([_trade_row(ctx.market.trade(index, n)) for n in numbers])


async def depth(request: web.Request) -> web.Response:
    """The book `depth_snapshot_lag_ms` ago, best levels first, up to `limit` a side."""
    ctx, rules, now = request.app[CONTEXT], request.app[RULES], now_ms()
    _, index = symbol_index(request)
    limit = _depth_limit(request)
    book_id = ctx.market.book_id_at(now - ctx.config.depth_snapshot_lag_ms)
    view = ctx.market.book_view(index, book_id, limit)
    times = {"E": now, "T": ctx.market.book_time(book_id)} if rules.depth_times else {}
    snapshot = {"lastUpdateId": ctx.venue.wire_id(index, book_id), **times, "bids": view.bids, "asks": view.asks}
    return json_response(snapshot)


def _from(first: int, last: int, limit: int) -> range:
    """Trade numbers from `first` (clamped to 0) up to `last`, at most `limit`."""
    first = max(first, 0)
    return range(first, min(first + limit - 1, last) + 1)


def _recent(last: int, limit: int) -> range:
    return range(max(0, last - limit + 1), last + 1)


def _agg_row(t: Trade, best_match: bool) -> dict[str, Any]:
    row = {
        "a": t.agg_id,
        "p": decimal_str(t.price),
        "q": decimal_str(t.qty),
        "f": t.id,
        "l": t.id,
        "T": t.time,
        "m": t.buyer_is_maker,
    }
    return {**row, "M": True} if best_match else row


def _trade_row(t: Trade) -> dict[str, Any]:
    return {
        "id": t.id,
        "price": decimal_str(t.price),
        "qty": decimal_str(t.qty),
        "quoteQty": decimal_str(t.price * t.qty),
        "time": t.time,
        "isBuyerMaker": t.buyer_is_maker,
        "isBestMatch": True,
    }


Endpoint = tuple[str, Handler, Weight]
"""(path under the rules' prefix, handler, Binance's request weight)."""

SPOT_RULES = RestRules(
    prefix="/api/v3",
    depth_default=100,
    depth_max=MAX_LEVELS,
    depth_weights=((100, 5), (500, 25), (1000, 50), (MAX_LEVELS, 250)),
    depth_times=False,
    kline_max=1000,
    second_klines=True,
    kline_weight=2,
    agg_trades_weight=4,
    agg_trade_best_match=True,
    history_ms=None,
)
SPOT_ENDPOINTS: list[Endpoint] = [
    ("/exchangeInfo", exchange_info, 20),
    ("/historicalTrades", historical_trades, 25),
    ("/trades", recent_trades, 25),
]


def install(app: web.Application, rules: RestRules, endpoints: list[Endpoint]) -> None:
    """Serve the shared endpoints by `rules`, plus the market's own `endpoints`."""
    shared: list[Endpoint] = [
        ("/ping", ping, 1),
        ("/time", server_time, 1),
        ("/klines", klines, rules.kline_weight),
        ("/aggTrades", agg_trades, rules.agg_trades_weight),
        ("/depth", depth, _depth_weight),
    ]
    app[RULES] = rules
    app[WEIGHTS] = {handler: weight for _, handler, weight in [*shared, *endpoints]}
    app.add_routes([web.get(rules.prefix + path, handler) for path, handler, _ in [*shared, *endpoints]])
