"""Every option of the fake exchange in one dataclass.

The CLI (`python -m fake_binance`) derives its flags from these fields, so a field
and its flag cannot drift apart: field `pong_timeout` is flag `--pong-timeout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fake_binance import listing

MARKET_EPOCH_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z: time of trade number 0 unless --genesis-ms says otherwise.

A fixed epoch (rather than "now" at start-up) makes the market continuous across
restarts: a fake started later numbers the same trades with the same ids at the same
times, so ids only grow and a recorder never sees an id re-used for another trade.
"""

DEFAULT_SYMBOLS: tuple[str, ...] = (
    "BTCUSDT",
    "ETHUSDT",
    "BNBUSDT",
    "SOLUSDT",
    "XRPUSDT",
    "ADAUSDT",
    "DOGEUSDT",
    "LTCUSDT",
    "TRXUSDT",
    "DOTUSDT",
)
USDM_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT")
COINM_SYMBOLS: tuple[str, ...] = ("BTCUSD_PERP", "ETHUSD_PERP")


def _option(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class FakeExchangeConfig:
    """Options of one fake exchange process; defaults are Binance's own limits."""

    host: str = _option("127.0.0.1", "Address to listen on.")
    port: int = _option(0, "TCP port; 0 picks a free one (printed at start-up).")
    symbols: tuple[str, ...] = _option(DEFAULT_SYMBOLS, "Listed symbols (uppercase).")
    extra_symbols: int = _option(0, "Adds SYM0001USDT, SYM0002USDT, ... for many-stream scale tests.")
    halted_symbols: tuple[str, ...] = _option(
        (), "Symbols whose exchangeInfo status is HALT (they still trade in the model)."
    )
    unlisted_symbols: tuple[str, ...] = _option(
        (),
        "Symbols the model trades but exchangeInfo does not list until a `set_status` control "
        "lists them (a listing mid-run).",
    )
    trades_per_second: float = _option(10.0, "Trades per second, per symbol.")
    genesis_ms: int = _option(
        MARKET_EPOCH_MS,
        "Time of trade number 0 (ms). The default, a fixed epoch (2026-01-01T00:00Z), "
        "keeps ids and times identical across restarts and between processes.",
    )
    depth_snapshot_lag_ms: int = _option(
        500,
        "Age of the book GET /api/v3/depth returns: its lastUpdateId is that much older "
        "than the live streams, so a client must re-fetch or buffer as Binance documents "
        "(0 = the current book).",
    )
    ping_interval: float = _option(20.0, "Seconds between server ping frames.")
    pong_timeout: float = _option(60.0, "Seconds a ping may stay unanswered before close.")
    max_incoming_per_second: int = _option(5, "Incoming messages (text, ping, pong) per second before a 1008 close.")
    max_streams_per_connection: int = _option(1024, "Streams one connection may hold.")
    max_connection_seconds: float = _option(
        86400.0, "Connection lifetime; then a normal close (Binance's 24 h disconnect)."
    )
    shutdown_grace_seconds: float = _option(
        1.0, "Delay between a serverShutdown event and the close of the connection."
    )
    chaos_drop_every: float = _option(0.0, "Mean seconds between abrupt drops of a random connection; 0 = off.")
    chaos_seed: int = _option(0, "Seed of the chaos dropper, so runs repeat.")
    weight_limit: int = _option(6000, "REST request weight allowed per UTC minute.")
    usdm_symbols: tuple[str, ...] = _option(
        USDM_SYMBOLS, "USDⓈ-M perpetuals (under /usdm); a current-quarter contract on the first one's pair is added."
    )
    coinm_symbols: tuple[str, ...] = _option(
        COINM_SYMBOLS, "COIN-M perpetuals (under /coinm); a current-quarter contract on the first one's pair is added."
    )
    futures_weight_limit: int = _option(
        2400, "REST request weight per UTC minute shared by /fapi and /dapi, as on Binance since 2026-06-30."
    )
    ban_seconds: int = _option(120, "Length of the HTTP 418 ban for ignoring a 429.")
    archive_missing_day: int = _option(
        4, "The archive (/data/spot/...) has no files for the day this many days before the start day; 0 = none."
    )
    archive_bad_checksum_day: int = _option(
        2, "The archive's CHECKSUM of this day (days before the start day) does not match its zip; 0 = none."
    )
    archive_truncated_day: int = _option(
        1, "The archive's files of this day (days before the start day) stop at 18:00 UTC; 0 = none."
    )
    market_load_rate: float = _option(
        0.0,
        "Market-load mode when > 0: spot lists --market-load-symbols symbols (instead of "
        "--symbols and --extra-symbols) and sends their trade, aggTrade, bookTicker and "
        "depth@100ms streams at this many messages per second in all, skewed by symbol "
        "rank (fake_binance/listing.py); 0 = off.",
    )
    market_load_symbols: int = _option(
        listing.DEFAULT_SYMBOLS, "Symbols the market-load mode lists: the real busiest ones first, then generated."
    )
    market_load_exponent: float = _option(
        listing.DEFAULT_EXPONENT, "Zipf exponent of the market-load mode's per-symbol rates (rank ** -exponent)."
    )

    def all_symbols(self) -> tuple[str, ...]:
        """Listed symbols followed by the generated extra ones, in a fixed order.

        The order matters: a symbol's position fixes its trade id base, so the same
        configuration always yields the same ids. The unlisted symbols come last. In
        market-load mode: the load's listing.
        """
        if self.market_load_rate > 0:
            return listing.market_symbols(self.market_load_symbols)
        extra = tuple(f"SYM{i:04d}USDT" for i in range(1, self.extra_symbols + 1))
        listed = tuple(self.symbols) + extra
        return listed + tuple(s for s in self.unlisted_symbols if s not in listed)
