"""A deterministic fake Binance market-data exchange (spot, USDⓈ-M and COIN-M futures)
for tests, demos and benchmarks.

Run it with `python -m fake_binance --port 0 ...`, or embed it:
`build_app(FakeExchangeConfig(...))` returns an aiohttp application serving
Binance's spot websocket streams (/ws, /stream), its market-data REST API (/api/v3) and
test controls (/fake/stats, /fake/book, /fake/control) on one port, and the same for
the futures markets under /usdm (/public/..., /market/..., /fapi/v1) and /coinm
(/stream, /ws, /dapi/v1).

Modules: `config` options; `tradeclock` trade number <-> time; `intervals` kline
windows; `market` the deterministic market model; `orderbook` its order books;
`streams` stream names and event payloads, and the `Venue` a market is (spot's);
`futures` the futures markets' venue; `contracts` futures contracts and their
lifecycle; `hub` the publishing loop; `ws` websocket sessions; `commands` the
SUBSCRIBE protocol; `rest` REST endpoints; `futures_rest` the futures-only ones;
`ratelimit` request weight and bans; `stats` counters; `control` test endpoints;
`chaos` random drops; `context` shared state; `server` app wiring; `__main__` the CLI.
"""

from fake_binance.config import FakeExchangeConfig
from fake_binance.server import build_app

__all__ = ["FakeExchangeConfig", "build_app"]
