"""Test-control endpoints under /fake/ (not Binance's): read stats, steer the fake.

`POST /fake/control` takes `{"action": ..., ...}`; every action acts at once and
answers `{"ok": true, ...}`, or HTTP 400 `{"ok": false, "error": ...}`.

`GET /fake/book?symbol=BTCUSDT[&update_id=N]` answers the fake's exact, full book at
update id N (default: now) as `{"update_id", "bids", "asks"}`, best first, so a test
can compare a client's rebuilt book level by level. Books are recomputed from the
model, so any id up to the current one can be asked for, however old. On a futures
market, where update ids are engine-wide, N may be any id: the book is the one in
effect then, and `update_id` says its own last update.

Each market has these endpoints under its prefix (/fake/..., /usdm/fake/...,
/coinm/fake/...), acting on that market's connections, book and counters; `settle`
exists on the futures markets only, `set_status` (list, halt, delist) on spot only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from fake_binance.context import CONTEXT, Context
from fake_binance.futures import FuturesVenue
from fake_binance.hub import now_ms
from fake_binance.listing import LoadPlan
from fake_binance.load import LoadHub
from fake_binance.market import UnknownSymbol
from fake_binance.streams import DELISTED, SPOT_STATUSES, SpotVenue
from worker.replay.binance_api import json_response as _json


class ControlError(ValueError):
    """A bad control request; its message goes back to the caller."""


async def get_stats(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    sessions = [s.info() for s in ctx.hub.sessions.values()]
    return _json(ctx.stats.snapshot(sessions, ctx.gate.used(now_ms())))


async def post_control(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
        if not isinstance(body, dict):
            raise ControlError("body must be a JSON object")
        action = _ACTIONS.get(body.get("action"))  # type: ignore[arg-type]
        if action is None:
            raise ControlError(f"unknown action {body.get('action')!r}; known: {sorted(_ACTIONS)}")
        result = action(request.app[CONTEXT], body)
    except (orjson.JSONDecodeError, ControlError) as exc:
        return _json({"ok": False, "error": str(exc)}, status=400)
    return _json({"ok": True, **result})


async def get_book(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        symbol = request.query.get("symbol", "")
        if symbol not in ctx.venue.symbols(now_ms()):
            raise UnknownSymbol(symbol)
        index = ctx.market.index(symbol)
        current = ctx.venue.wire_id(index, ctx.market.book_id_at(now_ms()))
        update_id = _query_int(request, "update_id", current)
        if not 0 <= update_id <= current:
            raise ControlError(f"update_id must be between 0 and the current {current}")
    except UnknownSymbol as exc:
        return _json({"ok": False, "error": f"unknown symbol {exc}"}, status=400)
    except ControlError as exc:
        return _json({"ok": False, "error": str(exc)}, status=400)
    view = ctx.market.order_book(index).full(ctx.venue.model_id(index, update_id))
    return _json({"update_id": ctx.venue.wire_id(index, view.update_id), "bids": view.bids, "asks": view.asks})


def _query_int(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ControlError(f"{name} must be a non-negative integer")
    return int(value)


def _number(body: dict[str, Any], name: str, default: float | None = None, minimum: float = 0) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ControlError(f"{name} must be a number >= {minimum}")
    return float(value)


def _server_shutdown(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    grace = _number(body, "grace_seconds", ctx.config.shutdown_grace_seconds)
    sessions = list(ctx.hub.sessions.values())
    for session in sessions:
        session.announce_shutdown(grace)
    return {"connections": len(sessions)}


def _drop_all(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    sessions = list(ctx.hub.sessions.values())
    for session in sessions:
        session.abort()
    return {"connections": len(sessions)}


def _close_all(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    sessions = list(ctx.hub.sessions.values())
    for session in sessions:
        session.close_soon(1000, "closed by test control")
    return {"connections": len(sessions)}


def _rest_fault(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    status = body.get("status")
    if status not in (429, 418):
        raise ControlError("status must be 429 or 418")
    count = int(_number(body, "count", 1, minimum=1))
    retry_after = int(_number(body, "retry_after", 1, minimum=1))
    ctx.gate.inject(status, count, retry_after)
    return {"status": status, "count": count, "retry_after": retry_after}


def _set_rate(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    rate = _number(body, "trades_per_second", minimum=0.001)
    ctx.market.clock.set_rate(rate, now_ms())
    return {"trades_per_second": rate}


def _set_load_rate(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """The market-load mode's total rate (messages per second), from the next tick on."""
    if not isinstance(ctx.hub, LoadHub):
        raise ControlError("set_load_rate needs the market-load mode (--market-load-rate)")
    rate = _number(body, "messages_per_second", minimum=1)
    ctx.hub.set_plan(LoadPlan.build(len(ctx.market.symbols), rate, ctx.hub.plan.exponent))
    return {"messages_per_second": rate, "scheduled_messages_per_second": ctx.hub.schedule.messages_per_second}


def _pause_data(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    seconds = _number(body, "seconds")
    ctx.hub.pause(seconds)
    return {"seconds": seconds}


def _mute_stream(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    stream = body.get("stream")
    if not isinstance(stream, str) or "@" not in stream:
        raise ControlError("stream must be a stream name such as 'btcusdt@trade'")
    seconds = _number(body, "seconds")
    ctx.hub.mute(stream, seconds)
    return {"stream": stream, "seconds": seconds}


def _settle(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """Settle a futures contract now: a delivery contract is DELIVERING, then delisted
    `delist_after_seconds` later; a perpetual is SETTLING and stays listed. Its streams
    stop at once (subscribers stay connected, unfed)."""
    if not isinstance(ctx.venue, FuturesVenue):
        raise ControlError("settle acts on futures contracts: POST it to /usdm/fake/control or /coinm/fake/control")
    symbol = body.get("symbol")
    delist_after = _number(body, "delist_after_seconds", 1.0)
    now = now_ms()
    try:
        contract = ctx.venue.settle(str(symbol), now, int(delist_after * 1000))
    except KeyError:
        known = ", ".join(sorted(ctx.venue.listed))
        raise ControlError(f"no trading contract {symbol!r} in {ctx.venue.name}; trading: {known}") from None
    return {
        "symbol": contract.symbol,
        "status": ctx.venue.status(contract, now),
        "silenced_streams": ctx.hub.silence(contract.symbol),
    }


def _set_status(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    """List, halt, resume or delist a spot symbol now: `status` TRADING lists a symbol of
    the model (one of --unlisted-symbols) or resumes a halted one; HALT or BREAK halts
    it (its streams keep trading in the model, as --halted-symbols); DELISTED takes it
    out of exchangeInfo and REST and stops its streams (subscribers stay, unfed)."""
    if not isinstance(ctx.venue, SpotVenue):
        raise ControlError("set_status acts on spot symbols: POST it to /fake/control (futures: settle)")
    symbol, status = body.get("symbol"), body.get("status")
    if status not in (*SPOT_STATUSES, DELISTED):
        raise ControlError(f"status must be one of {', '.join((*SPOT_STATUSES, DELISTED))}")
    try:
        ctx.venue.set_status(str(symbol), status)
    except UnknownSymbol:
        raise ControlError(
            f"{symbol!r} is not in the fake's model: start the fake with --unlisted-symbols {symbol} to list it later"
        ) from None
    silenced = ctx.hub.silence(str(symbol)) if status == DELISTED else 0
    return {"symbol": symbol, "status": status, "silenced_streams": silenced, "listed": len(ctx.venue.listed)}


def _reset_stats(ctx: Context, body: dict[str, Any]) -> dict[str, Any]:
    ctx.stats.reset()
    return {}


_ACTIONS: dict[str, Callable[[Context, dict[str, Any]], dict[str, Any]]] = {
    "server_shutdown": _server_shutdown,
    "drop_all": _drop_all,
    "close_all": _close_all,
    "rest_fault": _rest_fault,
    "set_rate": _set_rate,
    "set_load_rate": _set_load_rate,
    "pause_data": _pause_data,
    "mute_stream": _mute_stream,
    "reset_stats": _reset_stats,
    "settle": _settle,
    "set_status": _set_status,
}

ROUTES = [
    web.get("/fake/stats", get_stats),
    web.get("/fake/book", get_book),
    web.post("/fake/control", post_control),
]
