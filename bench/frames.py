"""Realistic combined-stream frames, encoded by the fake exchange's own encoders.

The benchmark feeds the recorder what Binance sends: `{"stream":..,"data":..}` trade
and aggTrade frames of several interleaved symbols, byte for byte as the fake
exchange (and so Binance) writes them. Using the fake's encoders keeps the frames
realistic without a second copy of the payload format.
"""

from __future__ import annotations

from collections.abc import Sequence

from fake_binance import streams
from fake_binance.config import DEFAULT_SYMBOLS
from fake_binance.market import Market
from fake_binance.tradeclock import TradeClock

GENESIS_MS = 1_700_000_000_000
KINDS: tuple[str, ...] = ("trade", "aggTrade")
STREAMS: tuple[str, ...] = tuple(f"{symbol.lower()}@{kind}" for symbol in DEFAULT_SYMBOLS for kind in KINDS)
"""The ten symbols' trade and aggTrade streams: 5,000 msg/s at 250 trades/s each."""
TARGET_RATE = 5000
"""Messages per second of the paced runs (end to end, scale, the old design)."""


def trade_frames(count: int, symbols: Sequence[str] = DEFAULT_SYMBOLS) -> list[bytes]:
    """`count` frames: every symbol's trade and aggTrade event for trade 0, 1, 2...

    The order (trade number, then symbol, then kind) is the order a combined stream
    of all of them delivers, so a batch interleaves symbols the way the drain sees it.
    """
    market = Market(tuple(symbols), TradeClock(GENESIS_MS, 1000.0))
    frames: list[bytes] = []
    n = 0
    while len(frames) < count:
        for index, symbol in enumerate(symbols):
            trade = market.trade(index, n)
            frames.append(_frame(symbol, "trade", streams.trade_event(symbol, trade, trade.time)))
            frames.append(_frame(symbol, "aggTrade", streams.agg_trade_event(symbol, trade, trade.time)))
        n += 1
    return frames[:count]


def _frame(symbol: str, kind: str, payload: bytes) -> bytes:
    return streams.combined_frame(f"{symbol.lower()}@{kind}".encode(), payload)
