"""Stream names and the JSON payloads of their events, field for field as Binance's.

Known kinds: trade, aggTrade, bookTicker, blockTrade, kline_<i>, ticker,
ticker_<1h|4h|1d>, miniTicker, avgPrice, referencePrice, depth[@100ms],
depth<5|10|20>[@100ms], and the all-market arrays !miniTicker@arr and
!ticker_<1h|4h|1d>@arr (every listed symbol, whether asked for or not).

Payloads are encoded once with orjson and shared by every connection that carries
the stream; a combined-stream frame is built by byte concatenation around the
already-encoded payload instead of re-encoding a wrapper object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from fake_binance import intervals
from fake_binance.market import BlockTrade, Book, Kline, Trade, WindowStats
from fake_binance.market import decimal_str as _d
from fake_binance.orderbook import BookDiff, BookView

# Kinds driven by each trade as it happens; the rest are emitted on a timer.
TRADE_KINDS = frozenset({"trade", "aggTrade", "bookTicker", "blockTrade"})
PER_SECOND_KINDS = frozenset({"ticker", "miniTicker", "avgPrice", "referencePrice"})
TICKER_WINDOWS: dict[str, int] = {"1h": 3_600_000, "4h": 14_400_000, "1d": 86_400_000}
# All-market streams: name -> (kind, ticker window).
ALL_MARKET: dict[str, tuple[str, str | None]] = {
    "!miniTicker@arr": ("miniTicker@arr", None),
    **{f"!ticker_{w}@arr": ("windowTicker@arr", w) for w in TICKER_WINDOWS},
}
SHUTDOWN_STREAM = b"!serverShutdown"
ALL_SYMBOLS = "ALL"  # the `sent` stats key of all-market streams
DAY_MS = 86_400_000
AVG_PRICE_MS = 300_000

_SYMBOL_PART = re.compile(r"[A-Za-z0-9._-]{1,40}")
_DEPTH_KIND = re.compile(r"depth(5|10|20)?(@100ms)?")


class InvalidStream(ValueError):
    """A stream name whose kind Binance does not know (the handshake gets HTTP 400)."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A parsed stream name. `symbol` is None when no listed symbol matches.

    `interval` is a kline interval or a ticker window (1h, 4h, 1d); `levels` is the
    N of a partial depth stream (0 for a diff-depth stream); `every_ms` the period
    of a depth stream (1000 or 100).
    """

    name: str
    symbol: str | None
    kind: str
    interval: str | None = None
    levels: int = 0
    every_ms: int = 0

    @property
    def stat_kind(self) -> str:
        """Key of the stream's kind in the `sent` stats (kline_1m, depth@100ms, ...)."""
        if self.name in ALL_MARKET:
            return self.name.removeprefix("!")
        return self.name.partition("@")[2]


def parse_stream(name: str, listed: frozenset[str]) -> StreamSpec:
    """Parse `<symbol>@<kind>`; an unlisted symbol is fine, an unknown kind is not.

    Symbols must be lowercase, as on Binance: `BTCUSDT@trade` parses but, like a
    delisted symbol, never delivers anything.
    """
    if name in ALL_MARKET:
        kind, window = ALL_MARKET[name]
        return StreamSpec(name, None, kind, window)
    part, sep, kind = name.partition("@")
    if not sep or not _SYMBOL_PART.fullmatch(part):
        raise InvalidStream(f"invalid stream name {name!r}")
    symbol = part.upper() if part.islower() and part.upper() in listed else None
    if kind in TRADE_KINDS or kind in PER_SECOND_KINDS:
        return StreamSpec(name, symbol, kind)
    depth = _DEPTH_KIND.fullmatch(kind)
    if depth:
        levels, fast = depth.groups()
        every_ms = 100 if fast else 1000
        if levels:
            return StreamSpec(name, symbol, "partialDepth", levels=int(levels), every_ms=every_ms)
        return StreamSpec(name, symbol, "depth", every_ms=every_ms)
    prefix, _, interval = kind.partition("_")
    if prefix == "kline" and interval in intervals.INTERVALS:
        return StreamSpec(name, symbol, "kline", interval)
    if prefix == "ticker" and interval in TICKER_WINDOWS:
        return StreamSpec(name, symbol, "windowTicker", interval)
    raise InvalidStream(f"invalid stream name {name!r}")


def combined_frame(stream: bytes, payload: bytes) -> bytes:
    """`{"stream":..,"data":..}` around an encoded payload (names need no escaping)."""
    return b'{"stream":"' + stream + b'","data":' + payload + b"}"


def trade_event(symbol: str, t: Trade, now_ms: int) -> bytes:
    return orjson.dumps(
        {
            "e": "trade",
            "E": now_ms,
            "s": symbol,
            "t": t.id,
            "p": _d(t.price),
            "q": _d(t.qty),
            "T": t.time,
            "m": t.buyer_is_maker,
            "M": True,
        }
    )


def agg_trade_event(symbol: str, t: Trade, now_ms: int) -> bytes:
    return orjson.dumps(
        {
            "e": "aggTrade",
            "E": now_ms,
            "s": symbol,
            "a": t.agg_id,
            "p": _d(t.price),
            "q": _d(t.qty),
            "f": t.id,
            "l": t.id,
            "T": t.time,
            "m": t.buyer_is_maker,
            "M": True,
        }
    )


def book_ticker_event(symbol: str, b: Book) -> bytes:
    return orjson.dumps({"u": b.update_id, "s": symbol, "b": b.bid, "B": b.bid_qty, "a": b.ask, "A": b.ask_qty})


def block_trade_event(symbol: str, t: BlockTrade, now_ms: int) -> bytes:
    return orjson.dumps(
        {
            "e": "blockTrade",
            "E": now_ms,
            "s": symbol,
            "t": t.id,
            "p": _d(t.price),
            "q": _d(t.qty),
            "T": t.time,
            "m": t.buyer_is_maker,
        }
    )


def depth_update_event(symbol: str, d: BookDiff, now_ms: int) -> bytes:
    """A diff-depth event: absolute quantities, "0" removes a level, U..u its ids."""
    return orjson.dumps(
        {
            "e": "depthUpdate",
            "E": now_ms,
            "s": symbol,
            "U": d.first,
            "u": d.last,
            "b": d.bids,
            "a": d.asks,
        }
    )


def book_levels(view: BookView) -> dict[str, object]:
    """`{lastUpdateId, bids, asks}`: a partial depth event and the REST snapshot alike."""
    return {"lastUpdateId": view.update_id, "bids": view.bids, "asks": view.asks}


def partial_depth_event(view: BookView) -> bytes:
    return orjson.dumps(book_levels(view))


def reference_price_event(symbol: str, price: float | None, now_ms: int) -> bytes:
    reference = None if price is None else _d(price)
    return orjson.dumps({"e": "referencePrice", "s": symbol, "r": reference, "t": now_ms})


def kline_event(symbol: str, interval: str, k: Kline, now_ms: int) -> bytes:
    s = k.stats
    return orjson.dumps(
        {
            "e": "kline",
            "E": now_ms,
            "s": symbol,
            "k": {
                "t": k.open_ms,
                "T": k.close_ms,
                "s": symbol,
                "i": interval,
                "f": s.first_id,
                "L": s.last_id,
                "o": _d(s.open),
                "c": _d(s.close),
                "h": _d(s.high),
                "l": _d(s.low),
                "v": _d(s.volume),
                "n": s.count,
                "x": k.closed,
                "q": _d(s.quote_volume),
                "V": _d(s.taker_buy_volume),
                "Q": _d(s.taker_buy_quote_volume),
                "B": "0",
            },
        }
    )


def mini_ticker(symbol: str, s: WindowStats, now_ms: int) -> dict[str, object]:
    """The 24hrMiniTicker object (alone, or one element of !miniTicker@arr)."""
    return {
        "e": "24hrMiniTicker",
        "E": now_ms,
        "s": symbol,
        "c": _d(s.close),
        "o": _d(s.open),
        "h": _d(s.high),
        "l": _d(s.low),
        "v": _d(s.volume),
        "q": _d(s.quote_volume),
    }


def mini_ticker_event(symbol: str, s: WindowStats, now_ms: int) -> bytes:
    return orjson.dumps(mini_ticker(symbol, s, now_ms))


def _price_change(s: WindowStats) -> dict[str, object]:
    """The p and P fields every ticker starts with."""
    change = s.close - s.open
    return {"p": _d(change), "P": f"{100.0 * change / s.open:.3f}"}


def _window_counts(s: WindowStats, open_ms: int, close_ms: int) -> dict[str, object]:
    """The O C F L n fields every ticker ends with."""
    return {"O": open_ms, "C": close_ms, "F": s.first_id, "L": s.last_id, "n": s.count}


def ticker_event(symbol: str, s: WindowStats, b: Book, now_ms: int) -> bytes:
    return orjson.dumps(
        {
            "e": "24hrTicker",
            "E": now_ms,
            "s": symbol,
            **_price_change(s),
            "w": _d(weighted_average(s)),
            "x": _d(s.prev_close),
            "c": _d(s.close),
            "Q": _d(s.last_qty),
            "b": b.bid,
            "B": b.bid_qty,
            "a": b.ask,
            "A": b.ask_qty,
            "o": _d(s.open),
            "h": _d(s.high),
            "l": _d(s.low),
            "v": _d(s.volume),
            "q": _d(s.quote_volume),
            **_window_counts(s, now_ms - DAY_MS, now_ms),
        }
    )


def window_ticker(symbol: str, window: str, s: WindowStats, now_ms: int) -> dict[str, object]:
    """The rolling-window ticker (1hTicker ...), alone or one element of its @arr."""
    return {
        "e": f"{window}Ticker",
        "E": now_ms,
        "s": symbol,
        **_price_change(s),
        "o": _d(s.open),
        "h": _d(s.high),
        "l": _d(s.low),
        "c": _d(s.close),
        "w": _d(weighted_average(s)),
        "v": _d(s.volume),
        "q": _d(s.quote_volume),
        **_window_counts(s, now_ms - TICKER_WINDOWS[window], now_ms),
    }


def encode(payload: object) -> bytes:
    return orjson.dumps(payload)


def avg_price_event(symbol: str, s: WindowStats, now_ms: int) -> bytes:
    return orjson.dumps(
        {
            "e": "avgPrice",
            "E": now_ms,
            "s": symbol,
            "i": "5m",
            "w": _d(weighted_average(s)),
            "T": s.last_time,
        }
    )


def shutdown_event(now_ms: int) -> bytes:
    return orjson.dumps({"e": "serverShutdown", "E": now_ms})


def weighted_average(s: WindowStats) -> float:
    return s.quote_volume / s.volume if s.volume else s.close
