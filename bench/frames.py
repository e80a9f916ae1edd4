"""Realistic combined-stream frames, encoded by the fake exchange's own encoders.

The benchmark feeds the recorder what Binance sends: `{"stream":..,"data":..}` trade
and aggTrade frames of several interleaved symbols, byte for byte as the fake
exchange (and so Binance) writes them. Using the fake's encoders keeps the frames
realistic without a second copy of the payload format.
"""

from __future__ import annotations

import struct
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


def websocket_wire(frames: Sequence[bytes]) -> bytes:
    """The frames as a server writes them on the wire: unmasked, final, text opcode.

    Pre-encoding the whole stream lets the blast server send with one buffer write,
    so it is always faster than any Python receiver it is measured against.
    """
    parts: list[bytes] = []
    for frame in frames:
        parts.append(_header(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def _header(length: int) -> bytes:
    """RFC 6455 frame header: FIN + text opcode, then the payload length."""
    if length < 126:
        return struct.pack("!BB", 0x81, length)
    if length < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)
