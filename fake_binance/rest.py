"""The REST endpoints under /api/v3, with Binance's parameters, rows and errors.

A middleware does what every endpoint shares: request weight (429/418, the
`X-MBX-USED-WEIGHT-1M` header), the mapping of `ApiError` to Binance's error body,
and the REST counters of /fake/stats. Handlers only read the market model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from fake_binance import intervals, streams
from fake_binance.context import CONTEXT, Context
from fake_binance.hub import now_ms
from fake_binance.market import Trade, UnknownSymbol, base_and_quote, decimal_str
from fake_binance.orderbook import MAX_LEVELS

_DEFAULT_LIMIT = 500
_MAX_LIMIT = 1000
_DEFAULT_DEPTH_LIMIT = 100
# Binance's depth weights: (largest limit, weight), ascending.
_DEPTH_WEIGHTS = ((100, 5), (500, 25), (1000, 50), (MAX_LEVELS, 250))
_HOUR_MS = 3_600_000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A Binance error answer: HTTP 400 with {"code": <negative>, "msg": ...}."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    ctx = request.app[CONTEXT]
    now = now_ms()
    weight = _WEIGHTS.get(request.path, 1)
    rejection = ctx.gate.admit(weight if isinstance(weight, int) else weight(request), now)
    if rejection is not None:
        response: web.StreamResponse = _error(rejection.code, rejection.msg, rejection.status)
        response.headers["Retry-After"] = str(rejection.retry_after)
    else:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error(exc.code, exc.msg, 400)
    response.headers["X-MBX-USED-WEIGHT-1M"] = str(ctx.gate.used(now))
    ctx.stats.record_rest(response.status)
    return response


def _error(code: int, msg: str, status: int) -> web.Response:
    return _json({"code": code, "msg": msg}, status)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# -- parameters -----------------------------------------------------------------


def _mandatory(request: web.Request, name: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise ApiError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")
    return value


def _symbol_index(request: web.Request) -> tuple[str, int]:
    symbol = _mandatory(request, "symbol")
    try:
        return symbol, request.app[CONTEXT].market.index(symbol)
    except UnknownSymbol:
        raise ApiError(-1121, "Invalid symbol.") from None


def _optional_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 20:
        raise ApiError(
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(value)


def _limit_error() -> ApiError:
    return ApiError(-1130, "Data sent for parameter 'limit' is not valid.")


def _limit(request: web.Request) -> int:
    limit = _optional_int(request, "limit")
    if limit is None:
        return _DEFAULT_LIMIT
    if not 1 <= limit <= _MAX_LIMIT:
        raise _limit_error()
    return limit


def _depth_limit(request: web.Request) -> int:
    """Default 100; above 5000 the answer is truncated to 5000, as Binance documents."""
    limit = _optional_int(request, "limit")
    if limit is None:
        return _DEFAULT_DEPTH_LIMIT
    if limit < 1:
        raise _limit_error()
    return min(limit, MAX_LEVELS)


def _depth_weight(request: web.Request) -> int:
    """Weight by the limit asked for; a malformed one is charged like the default."""
    try:
        limit = _depth_limit(request)
    except ApiError:
        limit = _DEFAULT_DEPTH_LIMIT
    return next(weight for most, weight in _DEPTH_WEIGHTS if limit <= most)


# -- endpoints ------------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    return _json({})


async def server_time(request: web.Request) -> web.Response:
    return _json({"serverTime": now_ms()})


async def exchange_info(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    wanted = _requested_symbols(request) or list(ctx.market.symbols)
    if any(s not in ctx.listed for s in wanted):
        raise ApiError(-1121, "Invalid symbol.")
    return _json(
        {
            "timezone": "UTC",
            "serverTime": now_ms(),
            "rateLimits": _rate_limits(ctx),
            "exchangeFilters": [],
            "symbols": [_symbol_info(s, s in ctx.config.halted_symbols) for s in wanted],
        }
    )


def _requested_symbols(request: web.Request) -> list[str]:
    """`symbol=X` or `symbols=["X","Y"]` (a JSON array); empty list = all."""
    symbol, symbols = request.query.get("symbol"), request.query.get("symbols")
    if symbol is not None and symbols is not None:
        raise ApiError(-1128, "Combination of optional parameters invalid.")
    if symbol is not None:
        return [_mandatory(request, "symbol")]
    if symbols is None:
        return []
    try:
        parsed = orjson.loads(symbols)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not parsed or not all(isinstance(s, str) for s in parsed):
        raise ApiError(
            -1100,
            "Illegal characters found in parameter 'symbols'; legal range is a JSON array of symbols.",
        )
    return parsed


def _rate_limits(ctx: Context) -> list[dict[str, Any]]:
    return [
        {
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": "MINUTE",
            "intervalNum": 1,
            "limit": ctx.config.weight_limit,
        },
        {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
        {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
        {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
    ]


def _symbol_info(symbol: str, halted: bool) -> dict[str, Any]:
    base, quote = base_and_quote(symbol)
    return {
        "symbol": symbol,
        "status": "HALT" if halted else "TRADING",
        "baseAsset": base,
        "baseAssetPrecision": 8,
        "quoteAsset": quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": [
            "LIMIT",
            "LIMIT_MAKER",
            "MARKET",
            "STOP_LOSS",
            "STOP_LOSS_LIMIT",
            "TAKE_PROFIT",
            "TAKE_PROFIT_LIMIT",
        ],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "opoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": False,
        "cancelReplaceAllowed": False,
        "amendAllowed": False,
        "pegInstructionsAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": True,
        "filters": [],
        "permissions": [],
        "permissionSets": [["SPOT", "MARGIN"]],
        "defaultSelfTradePreventionMode": "NONE",
        "allowedSelfTradePreventionModes": ["NONE"],
    }


async def klines(request: web.Request) -> web.Response:
    """Ascending klines by open time; only windows that have opened, from genesis on."""
    ctx = request.app[CONTEXT]
    _, index = _symbol_index(request)
    interval = _mandatory(request, "interval")
    if interval not in intervals.INTERVALS:
        raise ApiError(-1120, "Invalid interval.")
    start, end, limit = (
        _optional_int(request, "startTime"),
        _optional_int(request, "endTime"),
        _limit(request),
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
    return _json(rows)


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
    ctx = request.app[CONTEXT]
    _, index = _symbol_index(request)
    from_id = _optional_int(request, "fromId")
    start, end, limit = (
        _optional_int(request, "startTime"),
        _optional_int(request, "endTime"),
        _limit(request),
    )
    clock, now = ctx.market.clock, now_ms()
    last = clock.last_at(now)
    if from_id is not None:
        numbers = _from(from_id - ctx.market.agg_id_base(index), last, limit)
    elif start is not None:
        if end is not None and end - start > _HOUR_MS:
            raise ApiError(-1127, "More than 1 hours between startTime and endTime.")
        upto = last if end is None else min(last, clock.last_at(end))
        numbers = range(clock.first_at_or_after(start), upto + 1)[:limit]
    else:
        numbers = _recent(last if end is None else min(last, clock.last_at(end)), limit)
    return _json([_agg_row(ctx.market.trade(index, n)) for n in numbers])


async def historical_trades(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    _, index = _symbol_index(request)
    from_id, limit = _optional_int(request, "fromId"), _limit(request)
    last = ctx.market.last_n(now_ms())
    if from_id is None:
        numbers = _recent(last, limit)
    else:
        numbers = _from(from_id - ctx.market.trade_id_base(index), last, limit)
    return _json([_trade_row(ctx.market.trade(index, n)) for n in numbers])


async def recent_trades(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    _, index = _symbol_index(request)
    numbers = _recent(ctx.market.last_n(now_ms()), _limit(request))
    return _json([_trade_row(ctx.market.trade(index, n)) for n in numbers])


async def depth(request: web.Request) -> web.Response:
    """The book `depth_snapshot_lag_ms` ago, best levels first, up to `limit` a side."""
    ctx = request.app[CONTEXT]
    _, index = _symbol_index(request)
    limit = _depth_limit(request)
    book_id = ctx.market.book_id_at(now_ms() - ctx.config.depth_snapshot_lag_ms)
    return _json(streams.book_levels(ctx.market.book_view(index, book_id, limit)))


def _from(first: int, last: int, limit: int) -> range:
    """Trade numbers from `first` (clamped to 0) up to `last`, at most `limit`."""
    first = max(first, 0)
    return range(first, min(first + limit - 1, last) + 1)


def _recent(last: int, limit: int) -> range:
    return range(max(0, last - limit + 1), last + 1)


def _agg_row(t: Trade) -> dict[str, Any]:
    return {
        "a": t.agg_id,
        "p": decimal_str(t.price),
        "q": decimal_str(t.qty),
        "f": t.id,
        "l": t.id,
        "T": t.time,
        "m": t.buyer_is_maker,
        "M": True,
    }


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


# (path, handler, request weight): Binance's weights for these endpoints.
_ENDPOINTS: list[tuple[str, Handler, int | Callable[[web.Request], int]]] = [
    ("/api/v3/ping", ping, 1),
    ("/api/v3/time", server_time, 1),
    ("/api/v3/exchangeInfo", exchange_info, 20),
    ("/api/v3/klines", klines, 2),
    ("/api/v3/aggTrades", agg_trades, 4),
    ("/api/v3/historicalTrades", historical_trades, 25),
    ("/api/v3/trades", recent_trades, 25),
    ("/api/v3/depth", depth, _depth_weight),
]
_WEIGHTS = {path: weight for path, _, weight in _ENDPOINTS}
ROUTES = [web.get(path, handler) for path, handler, _ in _ENDPOINTS]
