"""The catalogue of stream kinds: their names, kline intervals, and the table each fills.

Every layer speaks this vocabulary: `subscribe` validates kinds with it, the drain routes
frames by it, backfill and charts step through kline intervals with it, and export maps
a user's `trade` or `kline_1m` to a table with it. Adding a stream kind starts here.
"""

from __future__ import annotations

_MINUTE = 60_000
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR

KLINE_INTERVALS: tuple[str, ...] = (
    "1s", "1m", "3m", "5m", "15m", "30m",
    "1h", "2h", "4h", "6h", "8h", "12h",
    "1d", "3d", "1w", "1M",
)  # fmt: skip
"""Binance's kline intervals, smallest first; "1m" is a minute and "1M" a month."""

INTERVAL_MS: dict[str, int] = {
    "1s": 1000, "1m": _MINUTE, "3m": 3 * _MINUTE, "5m": 5 * _MINUTE,
    "15m": 15 * _MINUTE, "30m": 30 * _MINUTE, "1h": _HOUR, "2h": 2 * _HOUR,
    "4h": 4 * _HOUR, "6h": 6 * _HOUR, "8h": 8 * _HOUR, "12h": 12 * _HOUR,
    "1d": _DAY, "3d": 3 * _DAY, "1w": 7 * _DAY,
}  # fmt: skip
"""Kline intervals of fixed length. `1M` (calendar months) is not one: its slots are 28
to 31 days apart."""

KIND_TABLES: dict[str, str] = {
    "trade": "trades",
    "aggTrade": "agg_trades",
    "kline": "klines",
    "ticker": "tickers",
    "miniTicker": "mini_tickers",
    "bookTicker": "book_tickers",
    "avgPrice": "avg_prices",
    "depth": "depth_updates",
    "depth5": "partial_depth",
    "depth10": "partial_depth",
    "depth20": "partial_depth",
    "ticker_1h": "window_tickers",
    "ticker_4h": "window_tickers",
    "ticker_1d": "window_tickers",
    "blockTrade": "block_trades",
    "referencePrice": "reference_prices",
}
"""Stream kind -> the table that records it; `kline` stands for every `kline_<interval>`."""

SUPPORTED_KINDS: tuple[str, ...] = tuple(KIND_TABLES)

DEPTH_KINDS: tuple[str, ...] = ("depth", "depth5", "depth10", "depth20")
"""The kinds Binance also sends every 100 ms when asked with `@100ms` (default 1 s)."""

FAST_SPEED = "100ms"

ALL_MARKET_STREAMS: tuple[str, ...] = ("!miniTicker@arr", "!ticker_1h@arr", "!ticker_4h@arr", "!ticker_1d@arr")
"""Streams of every symbol at once (a JSON list per event); subscribed by their full name."""

_CANONICAL_KINDS = {kind.lower(): kind for kind in SUPPORTED_KINDS if kind != "kline"}


def stream_kind(stream_name: str) -> str:
    """The kind part of a stream name, without symbol, interval, time zone or speed.

    "btcusdt@kline_1m" -> "kline", "btcusdt@depth20@100ms" -> "depth20",
    "!miniTicker@arr" -> "miniTicker", "btcusdt@ticker_1h" -> "ticker_1h" (a window
    ticker is another kind than the 24 h ticker).
    """
    if stream_name.startswith("!"):  # all-market streams: !<kind>[@arr]
        kind = stream_name[1:].partition("@")[0]
    else:  # <symbol>@<kind>[@<options>]
        kind = stream_name.partition("@")[2].partition("@")[0]
    return "kline" if kind.startswith("kline_") else kind


def validate_stream_kind(kind: str) -> str:
    """The canonical spelling of a kind a user asked for, e.g. "aggtrade" -> "aggTrade".

    Kinds are accepted in any case, intervals only as Binance spells them: "1m" is a
    minute and "1M" a month. An all-market stream (`!miniTicker@arr`) is its own
    stream name, spelled exactly as Binance does. Raises ValueError naming the bad kind and the valid ones.
    """
    if kind in ALL_MARKET_STREAMS:
        return kind
    base, at, speed = kind.partition("@")
    if at:
        return _with_speed(base, speed, kind)
    prefix, underscore, interval = kind.partition("_")
    if prefix.lower() == "kline" and underscore:
        if interval in KLINE_INTERVALS:
            return f"kline_{interval}"
        raise ValueError(f"unknown kline interval {interval!r} in {kind!r}: use one of {', '.join(KLINE_INTERVALS)}")
    canonical = _CANONICAL_KINDS.get(kind.lower())
    if canonical is None:
        raise ValueError(f"unknown stream kind {kind!r}: use one of {valid_kinds_text()}")
    return canonical


def _with_speed(base: str, speed: str, kind: str) -> str:
    """`depth@100ms`, `depth20@100ms`: only the depth kinds have a faster variant."""
    canonical = validate_stream_kind(base)
    if canonical not in DEPTH_KINDS or speed != FAST_SPEED:
        raise ValueError(
            f"unknown stream kind {kind!r}: only {', '.join(DEPTH_KINDS)} take a speed, and it is @{FAST_SPEED}"
        )
    return f"{canonical}@{speed}"


def valid_kinds_text(separator: str = ", ") -> str:
    """The kinds a user may ask for, with the kline intervals spelled out, for messages."""
    kline = f"kline_<interval> ({separator.join(KLINE_INTERVALS)})"
    kinds = ", ".join(kline if kind == "kline" else kind for kind in SUPPORTED_KINDS)
    return f"{kinds} (depth kinds also as <kind>@{FAST_SPEED}), or all-market {', '.join(ALL_MARKET_STREAMS)}"
