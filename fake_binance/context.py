"""The shared state of one fake exchange, stored on the aiohttp application.

Handlers in `ws`, `rest` and `control` reach everything through this one object
(`request.app[CONTEXT]`), so no module holds global state and two fakes can run in
one process. Each market is an application of its own (spot the root one, the
futures markets mounted under /usdm and /coinm), so `request.app` is the market the
request is for; the two futures markets share one engine model and one REST gate.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from fake_binance.config import FakeExchangeConfig
from fake_binance.hub import Hub
from fake_binance.market import Market
from fake_binance.ratelimit import RequestGate
from fake_binance.stats import Stats
from fake_binance.streams import Venue


@dataclass(frozen=True)
class Context:
    """One market of the fake (spot at the root, a futures market under its prefix)."""

    config: FakeExchangeConfig
    market: Market
    venue: Venue
    hub: Hub
    stats: Stats
    gate: RequestGate


CONTEXT = web.AppKey("fake_binance_context", Context)
