"""Binance's REST conventions, shared by the replay server and the bundled fake exchange.

One home for what both answer as Binance does: the `{"code", "msg"}` error body
(`ApiError`, `error_response`), the parsing of `limit`, the integer parameters and
`symbol`/`symbols`, request weights by limit, and a symbol's exchangeInfo entry. The
fake exchange (fake_binance/) imports them from here; nothing here imports the fake.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WeightTable = tuple[tuple[int, int], ...]
"""Binance's weights by limit: (largest limit, weight), ascending."""

DEFAULT_LIMIT, MAX_LIMIT = 500, 1000
"""`limit` of the trade and kline lists when none is asked for, and the most."""

QUOTE_ASSETS = ("USDT", "FDUSD", "USDC", "BTC", "ETH", "BNB")
"""Quote assets a symbol is split by (BTCUSDT -> BTC, USDT), the longest match first where it matters."""


class ApiError(Exception):
    """A Binance error answer: HTTP 400 with {"code": <negative>, "msg": ...}."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(code: int, msg: str, status: int) -> web.Response:
    """Binance's error body: `{"code": -1121, "msg": "Invalid symbol."}`."""
    return json_response({"code": code, "msg": msg}, status)


def mandatory(request: web.Request, name: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise ApiError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")
    return value


def optional_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 20:
        raise ApiError(
            -1100,
            f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.",
        )
    return int(value)


def limit_error() -> ApiError:
    return ApiError(-1130, "Data sent for parameter 'limit' is not valid.")


def limit_param(request: web.Request, default: int = DEFAULT_LIMIT, most: int = MAX_LIMIT) -> int:
    value = optional_int(request, "limit")
    if value is None:
        return default
    if not 1 <= value <= most:
        raise limit_error()
    return value


def truncated_limit(request: web.Request, default: int, most: int) -> int:
    """A depth `limit`: above the most levels the answer is truncated to them, as Binance documents."""
    value = optional_int(request, "limit")
    if value is None:
        return default
    if value < 1:
        raise limit_error()
    return min(value, most)


def weight_by_limit(
    table: WeightTable, limit_of: Callable[[web.Request], int], default: int
) -> Callable[[web.Request], int]:
    """A weight by the limit asked for; a malformed limit is charged like the `default` one."""

    def weight(request: web.Request) -> int:
        try:
            value = limit_of(request)
        except ApiError:
            value = default
        return next((weight for most, weight in table if value <= most), table[-1][1])

    return weight


def requested_symbols(request: web.Request) -> list[str]:
    """`symbol=X` or `symbols=["X","Y"]` (a JSON array); empty list = all."""
    symbol, symbols = request.query.get("symbol"), request.query.get("symbols")
    if symbol is not None and symbols is not None:
        raise ApiError(-1128, "Combination of optional parameters invalid.")
    if symbol is not None:
        return [mandatory(request, "symbol")]
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


def base_and_quote(symbol: str) -> tuple[str, str]:
    """Split a symbol into base and quote asset by its known quote suffix."""
    for quote in QUOTE_ASSETS:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    return symbol[:-4], symbol[-4:]


UNKNOWN_PRICE_FILTER = {
    "filterType": "PRICE_FILTER",
    "minPrice": "0.00000000",
    "maxPrice": "0.00000000",
    "tickSize": "0.00000000",
}
"""Binance's PRICE_FILTER with every rule disabled (a 0 disables a rule, as Binance documents):
no tick size is invented. Clients read the first filter as the price filter (cryptofeed
takes `filters[0]["tickSize"]`), so a listing without it fails them."""


def symbol_info(symbol: str, status: str, filters: tuple[dict[str, str], ...] = ()) -> dict[str, Any]:
    """A symbol's exchangeInfo entry; with no `filters` as Binance's documented example lists it."""
    base, quote = base_and_quote(symbol)
    return {
        "symbol": symbol,
        "status": status,
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
        "filters": list(filters),
        "permissions": [],
        "permissionSets": [["SPOT", "MARGIN"]],
        "defaultSelfTradePreventionMode": "NONE",
        "allowedSelfTradePreventionModes": ["NONE"],
    }
