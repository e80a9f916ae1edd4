"""Stream names and the JSON payloads of their events, field for field as Binance's.

Payloads are encoded once with orjson and shared by every connection that carries
the stream; a combined-stream frame is built by byte concatenation around the
already-encoded payload instead of re-encoding a wrapper object.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from fake_binance import intervals
from fake_binance.market import Book, Kline, Trade, WindowStats
from fake_binance.market import decimal_str as _d

# Kinds driven by each trade as it happens; the rest are emitted on a timer.
TRADE_KINDS = frozenset({"trade", "aggTrade", "bookTicker"})
PER_SECOND_KINDS = frozenset({"ticker", "miniTicker", "avgPrice"})
MINI_TICKER_ARR = "!miniTicker@arr"
SHUTDOWN_STREAM = b"!serverShutdown"
ALL_SYMBOLS = "ALL"  # the `sent` stats key of all-market streams
DAY_MS = 86_400_000
AVG_PRICE_MS = 300_000

_SYMBOL_PART = re.compile(r"[A-Za-z0-9._-]{1,40}")


class InvalidStream(ValueError):
    """A stream name whose kind Binance does not know (the handshake gets HTTP 400)."""


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A parsed stream name. `symbol` is None when no listed symbol matches."""

    name: str
    symbol: str | None
    kind: str
    interval: str | None = None

    @property
    def stat_kind(self) -> str:
        """Key of the stream's kind in the `sent` stats (kline_1m, trade, ...)."""
        return f"kline_{self.interval}" if self.kind == "kline" else self.kind


def parse_stream(name: str, listed: frozenset[str]) -> StreamSpec:
    """Parse `<symbol>@<kind>`; an unlisted symbol is fine, an unknown kind is not.

    Symbols must be lowercase, as on Binance: `BTCUSDT@trade` parses but, like a
    delisted symbol, never delivers anything.
    """
    if name == MINI_TICKER_ARR:
        return StreamSpec(name, None, "miniTicker@arr")
    part, sep, kind = name.partition("@")
    if not sep or not _SYMBOL_PART.fullmatch(part):
        raise InvalidStream(f"invalid stream name {name!r}")
    symbol = part.upper() if part.islower() and part.upper() in listed else None
    if kind in TRADE_KINDS or kind in PER_SECOND_KINDS:
        return StreamSpec(name, symbol, kind)
    prefix, _, interval = kind.partition("_")
    if prefix == "kline" and interval in intervals.INTERVALS:
        return StreamSpec(name, symbol, "kline", interval)
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
    return orjson.dumps(
        {
            "u": b.update_id,
            "s": symbol,
            "b": _d(b.bid),
            "B": _d(b.bid_qty),
            "a": _d(b.ask),
            "A": _d(b.ask_qty),
        }
    )


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


def mini_ticker_arr_event(tickers: list[dict[str, object]]) -> bytes:
    return orjson.dumps(tickers)


def ticker_event(symbol: str, s: WindowStats, b: Book, now_ms: int) -> bytes:
    change = s.close - s.open
    return orjson.dumps(
        {
            "e": "24hrTicker",
            "E": now_ms,
            "s": symbol,
            "p": _d(change),
            "P": f"{100.0 * change / s.open:.3f}",
            "w": _d(weighted_average(s)),
            "x": _d(s.prev_close),
            "c": _d(s.close),
            "Q": _d(s.last_qty),
            "b": _d(b.bid),
            "B": _d(b.bid_qty),
            "a": _d(b.ask),
            "A": _d(b.ask_qty),
            "o": _d(s.open),
            "h": _d(s.high),
            "l": _d(s.low),
            "v": _d(s.volume),
            "q": _d(s.quote_volume),
            "O": now_ms - DAY_MS,
            "C": now_ms,
            "F": s.first_id,
            "L": s.last_id,
            "n": s.count,
        }
    )


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
