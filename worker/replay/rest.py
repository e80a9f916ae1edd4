"""Binance's market-data REST API, answered from the recording as of the replay clock.

Never ahead of the clock: rows count once received (`received_at`) at or before it
(backfilled rows, which were never received, once their own time has passed), a
kline once it has closed (its stored row is its final state), and `/api/v3/depth` is
the book right after the last diff the clock passed, with that diff's `u` as
`lastUpdateId`, so the next diff sent starts at `lastUpdateId + 1`. Parameters,
limits, errors (`{"code", "msg"}`, HTTP 400) and the `X-MBX-USED-WEIGHT-1M` header
are Binance's (`binance_api`, which the fake exchange shares).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import Engine, Select, and_, func, or_, select

from worker.exchange.listings import exchange_info_on
from worker.ops.book import BookUnknown, book_after_update
from worker.replay.binance_api import (
    UNKNOWN_PRICE_FILTER,
    ApiError,
    Handler,
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
from worker.replay.frames import decimal_string
from worker.replay.session import SESSION, Session
from worker.store.depth import unpack_levels
from worker.store.storage import agg_trades, book_tickers, depth_snapshots, depth_updates, klines, trades
from worker.streams import INTERVAL_MS, SPOT
from worker.times import utc_datetime

WEIGHT_LIMIT = 6000
"""Binance's request weight per minute and IP."""

DEPTH_DEFAULT, DEPTH_MAX = 100, 5000
DEPTH_WEIGHTS = ((100, 5), (500, 25), (1000, 50), (5000, 250))
_WEIGHTS = web.AppKey("replay_weights", dict)


class _WeightWindow:
    """Request weight used in the current wall-clock minute, as Binance counts it."""

    def __init__(self) -> None:
        self.minute, self.used = 0, 0

    def add(self, weight: int) -> int:
        minute = int(time.time() // 60)
        if minute != self.minute:
            self.minute, self.used = minute, 0
        self.used += weight
        return self.used


_WINDOW = web.AppKey("replay_weight_window", _WeightWindow)
_LISTINGS_OF_DAYS = web.AppKey("replay_listings_of_days", dict)


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Weight, the weight header and Binance's error body for every /api/v3 endpoint."""
    weight = request.app[_WEIGHTS].get(request.match_info.handler)
    if weight is None:
        return await handler(request)
    used = request.app[_WINDOW].add(weight if isinstance(weight, int) else weight(request))
    response: web.StreamResponse
    if used > WEIGHT_LIMIT:
        message = f"Too many requests; current limit is {WEIGHT_LIMIT} request weight per 1 MINUTE."
        response = error_response(-1003, message, 429)
    else:
        try:
            response = await handler(request)
        except ApiError as error:
            response = error_response(error.code, error.msg, 400)
    response.headers["X-MBX-USED-WEIGHT-1M"] = response.headers["X-MBX-USED-WEIGHT"] = str(used)
    return response


def _session(request: web.Request) -> Session:
    return request.app[SESSION]


def _symbol(request: web.Request) -> str:
    """The `symbol` parameter, one of the window's recorded symbols; -1121 otherwise."""
    symbol = mandatory(request, "symbol")
    _check_recorded(request, [symbol])
    return symbol


def _check_recorded(request: web.Request, symbols: list[str]) -> None:
    if any(symbol not in _recorded_symbols(request) for symbol in symbols):
        raise ApiError(-1121, "Invalid symbol.")


def _recorded_symbols(request: web.Request) -> list[str]:
    return _session(request).symbols


async def _query(request: web.Request, work: Callable[[Engine], Any]) -> Any:
    """Run a database read off the event loop (the sender and the sockets go on)."""
    return await asyncio.to_thread(work, _session(request).window.engine)


def _rows(engine: Engine, query: Select[Any]) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(query))


def _received_until(request: web.Request) -> int:
    """The latest receive time a row may have to be answered: the clock's, but within the
    window, whose frames are those received before `--end` (where the clock stops)."""
    session = _session(request)
    return min(session.clock.now(), session.window.end_ms - 1)


def _received_by(table: Any, time_column: str, clock: int) -> Any:
    """Rows received at or before the clock; a backfilled row (never received) once its time has passed."""
    received = table.c.received_at
    return or_(received <= clock, and_(received.is_(None), table.c[time_column] <= clock))


# -- endpoints ------------------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    return json_response({})


async def server_time(request: web.Request) -> web.Response:
    return json_response({"serverTime": _session(request).clock.now()})


def _listing(request: web.Request, symbols: list[dict[str, Any]], **extra: Any) -> web.Response:
    """An exchangeInfo answer in Binance's shape, at the clock."""
    return json_response(
        {
            "timezone": "UTC",
            "serverTime": _session(request).clock.now(),
            **extra,
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": WEIGHT_LIMIT}
            ],
            "exchangeFilters": [],
            "symbols": symbols,
        }
    )


async def exchange_info(request: web.Request) -> web.Response:
    """The window's recorded symbols (all of them, `symbol=` or `symbols=[...]`): each as
    the listing of the clock's day has it (`exchange_info_snapshots`, kept by the listing
    follower), so clients get that day's status, tick and lot sizes; a symbol the day's
    listing lacks (none was kept) is TRADING with its price filter disabled."""
    asked = requested_symbols(request) or _recorded_symbols(request)
    _check_recorded(request, asked)
    of_the_day = await _listing_of_the_day(request)
    entries = [of_the_day.get(symbol) or symbol_info(symbol, "TRADING", (UNKNOWN_PRICE_FILTER,)) for symbol in asked]
    return _listing(request, entries)


async def _listing_of_the_day(request: web.Request) -> dict[str, dict[str, Any]]:
    """The spot listing kept for the clock's UTC day, by symbol (read once a day per session)."""
    day = utc_datetime(_session(request).clock.now()).strftime("%Y-%m-%d")
    kept = request.app[_LISTINGS_OF_DAYS]
    if day not in kept:
        body = await _query(request, lambda engine: exchange_info_on(engine, SPOT, day))
        kept[day] = {entry["symbol"]: entry for entry in orjson.loads(body)["symbols"]} if body else {}
    return kept[day]


async def usdm_exchange_info(request: web.Request) -> web.Response:
    """/fapi/v1/exchangeInfo: a replay of spot lists no USD-M contract. Answered rather than
    404, as clients (ccxt's load_markets) ask every market's listing and fail on an error."""
    return _listing(request, [], futuresType="U_MARGINED", assets=[])


async def coinm_exchange_info(request: web.Request) -> web.Response:
    """/dapi/v1/exchangeInfo: no COIN-M contract, as `usdm_exchange_info`."""
    return _listing(request, [])


def _depth_limit(request: web.Request) -> int:
    """Binance truncates a limit above 5000 to 5000."""
    return truncated_limit(request, DEPTH_DEFAULT, DEPTH_MAX)


async def depth(request: web.Request) -> web.Response:
    symbol, limit = _symbol(request), _depth_limit(request)
    session = _session(request)
    sent = session.last_diffs.get(symbol, (None, None))[0]
    start = session.window.start_ms
    return json_response(await _query(request, lambda engine: _depth_answer(engine, symbol, sent, start, limit)))


def _depth_answer(engine: Engine, symbol: str, sent: int | None, start_ms: int, limit: int) -> dict[str, Any]:
    """The book after the last diff sent (before any: the last received before the window).

    Inside a gap of the book, the snapshot recorded after it, never an invented book:
    the diffs sent up to it are then older than its lastUpdateId, as after a real
    reconnect, and the client resyncs on them.
    """
    if sent is None:
        column = depth_updates.c.final_update_id
        query = select(func.max(column)).where(depth_updates.c.symbol == symbol, depth_updates.c.received_at < start_ms)
        sent = _rows(engine, query)[0][0]
    try:
        if sent is None:
            raise BookUnknown(f"no diff of {symbol} was received before the replay's start")
        book = book_after_update(engine, symbol, sent, limit)
        bids, asks, update_id = book.bids, book.asks, book.update_id
    except BookUnknown as error:
        snapshot = _snapshot_after(engine, symbol, sent or 0)
        if snapshot is None:
            raise ApiError(-1, f"No order book of {symbol} is known at the replay clock: {error}") from None
        update_id, packed_bids, packed_asks = snapshot
        bids, asks = unpack_levels(packed_bids)[:limit], unpack_levels(packed_asks)[:limit]
    return {"lastUpdateId": update_id, "bids": _levels(bids), "asks": _levels(asks)}


def _snapshot_after(engine: Engine, symbol: str, update_id: int) -> tuple[int, bytes, bytes] | None:
    columns = depth_snapshots.c
    query = (
        select(columns.last_update_id, columns.bids, columns.asks)
        .where(columns.symbol == symbol, columns.last_update_id >= update_id)
        .order_by(columns.last_update_id)
        .limit(1)
    )
    found = _rows(engine, query)
    return None if not found else (found[0][0], found[0][1], found[0][2])


def _levels(levels: list[tuple[float, float]]) -> list[list[str]]:
    return [[decimal_string(price), decimal_string(qty)] for price, qty in levels]


def _window(
    request: web.Request, table: Any, key: str, time_column: str, taken: tuple[str, ...]
) -> tuple[Select[Any], bool]:
    """The rows of `symbol` by `fromId`, `startTime`/`endTime` or the latest ones, up to
    the clock; and whether the query takes them newest first (the latest ones). Only the
    parameters the endpoint `taken` count: Binance ignores the others (`/trades` takes
    none of them, `/historicalTrades` only `fromId`)."""
    symbol, limit = _symbol(request), limit_param(request, 500, 1000)
    clock = _received_until(request)
    from_id, start, end = (optional_int(request, name) if name in taken else None for name in _BY)
    query = select(table).where(table.c.symbol == symbol, _received_by(table, time_column, clock))
    if from_id is not None:
        return query.where(table.c[key] >= from_id).order_by(table.c[key]).limit(limit), False
    if start is not None or end is not None:
        if start is not None and end is not None and end - start > 3_600_000:
            raise ApiError(-1127, "More than 1 hours between startTime and endTime.")
        if start is not None:
            query = query.where(table.c[time_column] >= start)
        if end is not None:
            query = query.where(table.c[time_column] <= end)
        return query.order_by(table.c[key]).limit(limit), False
    return query.order_by(table.c[key].desc()).limit(limit), True


_BY = ("fromId", "startTime", "endTime")


async def _ascending(request: web.Request, query: Select[Any], newest_first: bool) -> list[Any]:
    """The rows of the query, oldest first as Binance lists them."""
    rows = await _query(request, lambda engine: _rows(engine, query))
    return rows[::-1] if newest_first else rows


async def aggregate_trades(request: web.Request) -> web.Response:
    query, newest_first = _window(request, agg_trades, "agg_id", "trade_time", _BY)
    rows = await _ascending(request, query, newest_first)
    return json_response(
        [
            {
                "a": r.agg_id,
                "p": decimal_string(r.price),
                "q": decimal_string(r.qty),
                "f": r.first_trade_id,
                "l": r.last_trade_id,
                "T": r.trade_time,
                "m": r.buyer_is_maker,
                "M": True,
            }
            for r in rows
        ]
    )


async def recent_trades(request: web.Request) -> web.Response:
    """/api/v3/trades: the latest trades at the clock (`symbol`, `limit`)."""
    return await _trade_rows(request, ())


async def historical_trades(request: web.Request) -> web.Response:
    """/api/v3/historicalTrades: from `fromId`, else the latest at the clock."""
    return await _trade_rows(request, ("fromId",))


async def _trade_rows(request: web.Request, taken: tuple[str, ...]) -> web.Response:
    query, newest_first = _window(request, trades, "trade_id", "trade_time", taken)
    rows = await _ascending(request, query, newest_first)
    return json_response(
        [
            {
                "id": r.trade_id,
                "price": decimal_string(r.price),
                "qty": decimal_string(r.qty),
                "quoteQty": decimal_string(r.price * r.qty),
                "time": r.trade_time,
                "isBuyerMaker": r.buyer_is_maker,
                "isBestMatch": True,
            }
            for r in rows
        ]
    )


async def kline_rows(request: web.Request) -> web.Response:
    """Closed klines only: a stored kline is its last update, which the clock has not reached while it is open."""
    symbol = _symbol(request)
    interval = mandatory(request, "interval")
    if interval not in INTERVAL_MS:
        raise ApiError(-1120, "Invalid interval.")
    limit = limit_param(request, 500, 1000)
    clock = _session(request).clock.now()
    start, end = optional_int(request, "startTime"), optional_int(request, "endTime")
    c = klines.c
    query = select(klines).where(c.symbol == symbol, c.interval == interval, c.close_time < clock)
    if start is not None:
        query = query.where(c.open_time >= start)
    if end is not None:
        query = query.where(c.open_time <= end)
    newest_first = start is None  # without a start, the latest klines
    ordered = query.order_by(c.open_time.desc() if newest_first else c.open_time)
    rows = await _ascending(request, ordered.limit(limit), newest_first)
    return json_response(
        [
            [
                r.open_time,
                *(decimal_string(v) for v in (r.open, r.high, r.low, r.close, r.volume)),
                r.close_time,
                decimal_string(r.quote_volume),
                r.trade_count,
                decimal_string(r.taker_buy_base_volume),
                decimal_string(r.taker_buy_quote_volume),
                "0",
            ]
            for r in rows
        ]
    )


async def book_ticker(request: web.Request) -> web.Response:
    """The last best bid and ask received at or before the clock, of one symbol (an object),
    of `symbols=[...]` or of all (a list)."""
    clock = _received_until(request)
    asked = requested_symbols(request) or _recorded_symbols(request)
    _check_recorded(request, asked)
    c = book_tickers.c
    latest = (
        select(c.symbol, func.max(c.update_id).label("update_id"))
        .where(c.symbol.in_(asked), c.received_at <= clock)
        .group_by(c.symbol)
        .subquery()
    )
    query = select(book_tickers).join(latest, and_(c.symbol == latest.c.symbol, c.update_id == latest.c.update_id))
    rows = await _query(request, lambda engine: _rows(engine, query))
    answer = [
        {
            "symbol": r.symbol,
            "bidPrice": decimal_string(r.bid_price),
            "bidQty": decimal_string(r.bid_qty),
            "askPrice": decimal_string(r.ask_price),
            "askQty": decimal_string(r.ask_qty),
        }
        for r in sorted(rows, key=lambda r: asked.index(r.symbol))
    ]
    return json_response(answer[0] if "symbol" in request.query and answer else answer)


async def replay_gaps(request: web.Request) -> web.Response:
    """The window's recorded gaps, on the replay's clock."""
    return json_response([gap.as_json() for gap in _session(request).gaps])


async def replay_status(request: web.Request) -> web.Response:
    """The clock, whether the window has been sent to its end, and each symbol's last diff
    sent (`u`, `E`): a script knows its book is complete when its last diff is that one."""
    session = _session(request)
    return json_response(
        {
            "clock": session.clock.now(),
            "ended": session.finished,
            "framesSent": session.frames_sent,
            "clients": len(session.clients),
            "lastDiffs": {symbol: {"u": u, "E": e} for symbol, (u, e) in session.last_diffs.items()},
        }
    )


ENDPOINTS: tuple[tuple[str, Handler, int | Callable[[web.Request], int]], ...] = (
    ("/api/v3/ping", ping, 1),
    ("/api/v3/time", server_time, 1),
    ("/api/v3/exchangeInfo", exchange_info, 20),
    ("/fapi/v1/exchangeInfo", usdm_exchange_info, 1),
    ("/dapi/v1/exchangeInfo", coinm_exchange_info, 1),
    ("/api/v3/depth", depth, weight_by_limit(DEPTH_WEIGHTS, _depth_limit, DEPTH_DEFAULT)),
    ("/api/v3/aggTrades", aggregate_trades, 4),
    ("/api/v3/trades", recent_trades, 25),
    ("/api/v3/historicalTrades", historical_trades, 25),
    ("/api/v3/klines", kline_rows, 2),
    ("/api/v3/ticker/bookTicker", book_ticker, 2),
)
"""Path, handler, request weight (Binance's, per request or by the limit asked for)."""


def add_routes(app: web.Application) -> None:
    app[_WEIGHTS] = {handler: weight for _, handler, weight in ENDPOINTS}
    app[_WINDOW] = _WeightWindow()
    app[_LISTINGS_OF_DAYS] = {}
    for path, handler, _ in ENDPOINTS:
        app.router.add_get(path, handler)
    app.router.add_get("/replay/gaps", replay_gaps)
    app.router.add_get("/replay/status", replay_status)
