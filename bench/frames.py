"""Realistic combined-stream frames, encoded by the fake exchange's own encoders.

The benchmark feeds the recorder what Binance sends: `{"stream":..,"data":..}` trade
and aggTrade frames of several interleaved symbols, byte for byte as the fake
exchange (and so Binance) writes them. Using the fake's encoders keeps the frames
realistic without a second copy of the payload format.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fake_binance import listing, streams
from fake_binance.config import DEFAULT_SYMBOLS
from fake_binance.hub import now_ms
from fake_binance.load import TICK_MS, LoadHub
from fake_binance.market import Market
from fake_binance.stats import Stats
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


MARKET_SYMBOLS = 1500
MARKET_RATE = 40_000.0
"""The whole market's mix (bench/market.py's full size): 1,500 symbols at 40,000 msg/s."""
MARKET_MODEL_TRADES_PER_SECOND = 5.0
"""The fake's book model pace in the market load (3 book updates per model trade, for every
symbol alike): the busiest symbols' depth@100ms diffs come at most this often, and a quiet
symbol's diff carries the updates since its last one. 5 keeps the fake's depth work (it
computes every diff, so that they agree with the REST snapshots) near a tenth of a core at
40,000 msg/s; the fake's default of 10 doubles it."""


class _WireSink:
    """A combined-stream subscriber of the market-load hub that keeps what it is sent."""

    id = 0
    combined = True

    def __init__(self) -> None:
        self.wire: list[bytes] = []

    def write_wire(self, data: bytes) -> None:
        self.wire.append(data)


def market_ticks(symbols: int = MARKET_SYMBOLS, rate: float = MARKET_RATE) -> Iterator[tuple[int, list[bytes]]]:
    """The whole market's mix, one 10 ms tick after another: (its time, its combined-stream
    frames), as the fake's market-load mode sends them: trade, aggTrade, bookTicker and
    depth@100ms of `symbols` symbols, Zipf-skewed at `rate` messages per second
    (fake_binance/listing.py).

    The fake's own publisher (`load.LoadHub`) makes them, ticked on a simulated clock
    from now on, so the mix, the frames' sizes and the depth diffs are the load test's.
    """
    names = listing.market_symbols(symbols)
    market = Market(names, TradeClock(GENESIS_MS, MARKET_MODEL_TRADES_PER_SECOND))
    venue = streams.SpotVenue(market, frozenset())
    hub = LoadHub(market, venue, Stats(), listing.LoadPlan.build(symbols, rate))
    sink = _WireSink()
    for name in names:
        for kind in listing.KINDS:
            hub.attach(sink, venue.parse_stream(f"{name.lower()}@{kind}", ""))  # type: ignore[arg-type]
    now = now_ms()
    while True:
        now += TICK_MS
        hub.tick(now)
        yield now, [frame for wire in sink.wire for frame in wire_payloads(wire)]
        sink.wire.clear()


def market_frames(count: int) -> list[bytes]:
    """`count` frames of the whole market's mix (`market_ticks`), for the blast server."""
    frames: list[bytes] = []
    ticks = market_ticks()
    while len(frames) < count:
        frames.extend(next(ticks)[1])
    return frames[:count]


def wire_payloads(wire: bytes) -> list[bytes]:
    """The payloads of consecutive unmasked server frames (`worker.replay.wire.websocket_wire`'s inverse)."""
    payloads: list[bytes] = []
    at = 0
    while at < len(wire):
        length, at = wire[at + 1] & 0x7F, at + 2
        if length == 126:
            length, at = int.from_bytes(wire[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(wire[at : at + 8], "big"), at + 8
        payloads.append(wire[at : at + length])
        at += length
    return payloads
