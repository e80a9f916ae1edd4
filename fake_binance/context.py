"""The shared state of one fake exchange, stored on the aiohttp application.

Handlers in `ws`, `rest` and `control` reach everything through this one object
(`request.app[CONTEXT]`), so no module holds global state and two fakes can run in
one process.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from fake_binance.config import FakeExchangeConfig
from fake_binance.hub import Hub
from fake_binance.market import Market
from fake_binance.ratelimit import RequestGate
from fake_binance.stats import Stats


@dataclass(frozen=True)
class Context:
    config: FakeExchangeConfig
    market: Market
    hub: Hub
    stats: Stats
    gate: RequestGate
    listed: frozenset[str]


CONTEXT = web.AppKey("fake_binance_context", Context)
