"""Wiring: one aiohttp application serving websocket streams, REST and test controls
on a single port, plus the background tasks (publisher, chaos) tied to its life."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from fake_binance import chaos, control, rest, ws
from fake_binance.config import FakeExchangeConfig
from fake_binance.context import CONTEXT, Context
from fake_binance.hub import Hub
from fake_binance.market import Market
from fake_binance.ratelimit import RequestGate
from fake_binance.stats import Stats
from fake_binance.tradeclock import TradeClock

# 1024 stream names in one /stream?streams=... URL need far more than aiohttp's 8 KiB.
_MAX_REQUEST_LINE_BYTES = 1 << 16


def build_app(config: FakeExchangeConfig) -> web.Application:
    """The fake exchange for `config`; start it with any aiohttp runner."""
    market = Market(config.all_symbols(), TradeClock(config.genesis_ms, config.trades_per_second))
    stats = Stats()
    app = web.Application(middlewares=[rest.api_middleware], handler_args={"max_line_size": _MAX_REQUEST_LINE_BYTES})
    app[CONTEXT] = Context(
        config=config,
        market=market,
        hub=Hub(market, stats, frozenset(config.halted_symbols)),
        stats=stats,
        gate=RequestGate(config.weight_limit, config.ban_seconds),
        listed=frozenset(market.symbols),
    )
    app.add_routes([*ws.ROUTES, *rest.ROUTES, *control.ROUTES])
    app.cleanup_ctx.append(_background_tasks)
    app.on_shutdown.append(_close_connections)
    return app


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    tasks = [asyncio.ensure_future(ctx.hub.run())]
    if ctx.config.chaos_drop_every > 0:
        tasks.append(asyncio.ensure_future(chaos.drop_connections_randomly(ctx)))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _close_connections(app: web.Application) -> None:
    """Say goodbye (1001 going away) so handlers end before the server stops."""
    for session in list(app[CONTEXT].hub.sessions.values()):
        session.close_soon(1001, "server stopping")
