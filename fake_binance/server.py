"""Wiring: one aiohttp application per market on a single port, plus the background
tasks (publisher, chaos) tied to each one's life.

Spot is the root application (/ws, /stream, /api/v3, /fake/..., and the public data
archive's /data/spot/...). The futures markets
are sub-applications mounted under `FUTURES_PREFIXES` (/usdm: /public/..., /market/...,
/fapi/v1; /coinm: /stream, /ws, /dapi/v1; each with its own /fake/...), so a client
reaches a futures market purely by its base URL, e.g. `ws://HOST:PORT/usdm` and
`http://HOST:PORT/usdm`. The two futures markets share one engine model (both
markets' contracts, one clock) and one REST gate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from aiohttp import web

from fake_binance import archive, chaos, control, futures_rest, rest, ws
from fake_binance.config import FakeExchangeConfig
from fake_binance.context import CONTEXT, Context
from fake_binance.contracts import COINM, USDM, Lifecycle, futures_contracts
from fake_binance.futures import MARKET, PUBLIC, FuturesVenue
from fake_binance.hub import Hub, now_ms
from fake_binance.listing import LoadPlan
from fake_binance.load import LoadHub
from fake_binance.market import Market
from fake_binance.ratelimit import RequestGate
from fake_binance.stats import Stats
from fake_binance.streams import SpotVenue, Venue
from fake_binance.tradeclock import TradeClock

# 1024 stream names in one /stream?streams=... URL need far more than aiohttp's 8 KiB.
_MAX_REQUEST_LINE_BYTES = 1 << 16
FUTURES_PREFIXES = {USDM: "/usdm", COINM: "/coinm"}
_REST_PREFIXES = {USDM: "/fapi/v1", COINM: "/dapi/v1"}
_STREAM_ROUTES = {USDM: (PUBLIC, MARKET), COINM: ()}


def futures_urls(base: str) -> dict[str, str]:
    """The recorder's futures settings that point it at a fake whose root is `base`
    (`http://HOST:PORT`): the fake is purely a matter of base URLs."""
    urls = {}
    for name, prefix in FUTURES_PREFIXES.items():
        urls[f"BINANCE_{name.upper()}_WS_URL"] = base.replace("http://", "ws://") + prefix
        urls[f"BINANCE_{name.upper()}_REST_URL"] = base + prefix
    return urls


def build_app(config: FakeExchangeConfig) -> web.Application:
    """The fake exchange for `config`; start it with any aiohttp runner."""
    market = Market(config.all_symbols(), _clock(config))
    spot_gate = RequestGate(config.weight_limit, config.ban_seconds)
    spot = SpotVenue(market, frozenset(config.halted_symbols), frozenset(config.unlisted_symbols))
    app = _market_app(config, market, spot, spot_gate, _spot_hub(config, market, spot))
    rest.install(app, rest.SPOT_RULES, rest.SPOT_ENDPOINTS)
    app.add_routes(ws.routes())
    app[archive.DEFECTS] = archive.Defects.counted_back(
        datetime.now(tz=UTC).date(),
        config.archive_missing_day,
        config.archive_bad_checksum_day,
        config.archive_truncated_day,
    )
    app.add_routes(archive.ROUTES)
    contracts = futures_contracts(config.usdm_symbols, config.coinm_symbols, now_ms())
    engine = Market(tuple(c.symbol for c in contracts), _clock(config))
    lifecycle = Lifecycle()
    gate = RequestGate(config.futures_weight_limit, config.ban_seconds)
    for name, prefix in FUTURES_PREFIXES.items():
        venue = FuturesVenue(name, engine, contracts, lifecycle)
        sub = _market_app(config, engine, venue, gate)
        sub[futures_rest.VENUE] = venue
        rest.install(sub, futures_rest.rules(_REST_PREFIXES[name]), futures_rest.ENDPOINTS)
        sub.add_routes(ws.routes(_STREAM_ROUTES[name]))
        app.add_subapp(prefix, sub)
    return app


def _clock(config: FakeExchangeConfig) -> TradeClock:
    return TradeClock(config.genesis_ms, config.trades_per_second)


def _spot_hub(config: FakeExchangeConfig, market: Market, venue: Venue) -> Callable[[Stats], Hub]:
    """Spot's publisher: the market-load one when that mode is on (`load.LoadHub`)."""
    if config.market_load_rate > 0:
        plan = LoadPlan.build(len(market.symbols), config.market_load_rate, config.market_load_exponent)
        return lambda stats: LoadHub(market, venue, stats, plan)
    return lambda stats: Hub(market, venue, stats)


def _market_app(
    config: FakeExchangeConfig,
    market: Market,
    venue: Venue,
    gate: RequestGate,
    hub: Callable[[Stats], Hub] | None = None,
) -> web.Application:
    """The application of one market: its context, control endpoints and life cycle
    (`hub` builds its publisher from its counters; default the ordinary one)."""
    stats = Stats()
    app = web.Application(middlewares=[rest.api_middleware], handler_args={"max_line_size": _MAX_REQUEST_LINE_BYTES})
    publisher = hub(stats) if hub else Hub(market, venue, stats)
    app[CONTEXT] = Context(config=config, market=market, venue=venue, hub=publisher, stats=stats, gate=gate)
    app.add_routes(control.ROUTES)
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
