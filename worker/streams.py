"""The catalogue of markets and stream kinds: the markets (spot, USDⓈ-M and COIN-M
futures), the kinds each records, their kline intervals, and the table each fills.

Every layer speaks this vocabulary: `subscribe` validates kinds with it, the drain routes
frames by it, backfill and charts step through kline intervals with it, and export maps
a user's `trade` or `kline_1m` to a table with it. Adding a stream kind or a market
starts here.
"""

from __future__ import annotations

from dataclasses import dataclass

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
"""Stream kind -> the table that records it; `kline` stands for every `kline_<interval>`.
These are spot's kinds; the futures markets record most of them too, in tables of the
same name with the market's prefix (`MARKETS` below)."""

FUTURES_KIND_TABLES: dict[str, str] = {
    "markPrice": "mark_prices",
    "forceOrder": "liquidations",
    "continuousKline": "continuous_klines",
    "markPriceKline": "mark_price_klines",
    "indexPriceKline": "index_price_klines",
    "indexPrice": "index_prices",
    "compositeIndex": "composite_index",
    "contractInfo": "contract_info",
}
"""The kinds only futures have -> their table (without the market's prefix); which
futures market has which kind, `MARKETS` says."""

KLINE_KINDS: tuple[str, ...] = ("kline", "continuousKline", "markPriceKline", "indexPriceKline")
"""The kinds streamed as `<name>_<interval>`: each stands for every interval."""

SUPPORTED_KINDS: tuple[str, ...] = tuple(KIND_TABLES)

DEPTH_KINDS: tuple[str, ...] = ("depth", "depth5", "depth10", "depth20")
"""The kinds Binance also sends every 100 ms when asked with `@100ms` (default 1 s)."""

FAST_SPEED = "100ms"

SPEEDS: dict[str, str] = {**dict.fromkeys(DEPTH_KINDS, FAST_SPEED), "markPrice": "1s", "indexPrice": "1s"}
"""Kinds with a faster variant, `<kind>@<speed>`: the depth kinds every 100 ms (default
1 s on spot, 250 ms on futures), futures' mark price and COIN-M's index price every
second (default 3 s)."""

PAIR_KINDS: tuple[str, ...] = ("continuousKline", "indexPriceKline", "indexPrice")
"""Futures kinds named by a pair (`btcusdt_perpetual@continuousKline_1m`, `btcusd@indexPrice`),
not by a contract's symbol: `subscribe BTCUSD --streams indexPrice` names the pair, checked
against the market's exchangeInfo `pair` field."""

CONTRACT_TYPES: tuple[str, ...] = ("perpetual", "current_quarter", "next_quarter")
"""The contract types of Binance's continuous klines, `<pair>_<contractType>@continuousKline_<i>`,
the first the default: `continuousKline_1m` is the perpetual's, `continuousKline_current_quarter_1m`
a quarter's (the kind spells the type between the name and the interval, as Binance's stream
name does between the pair and the kind, so one `--streams` list can ask for several)."""

MARKET_WIDE_KINDS: tuple[str, ...] = ("contractInfo",)
"""Kinds streamed only for the whole market (`!contractInfo`): no `<symbol>@` stream has them."""

PUBLIC_ROUTE_KINDS: tuple[str, ...] = (*DEPTH_KINDS, "bookTicker", "trade")
"""The USDⓈ-M kinds on the `/public` route (order books and bookTicker; the undocumented
`@trade` was observed there, binance-protocol.md); every other kind goes to `/market`.
A stream on the other route is acknowledged and then never delivers."""

ALL_MARKET_STREAMS: tuple[str, ...] = ("!miniTicker@arr", "!ticker_1h@arr", "!ticker_4h@arr", "!ticker_1d@arr")
"""Spot's streams of every symbol at once (a JSON list per event); subscribed by their full name."""

FUTURES_ALL_MARKET_STREAMS: tuple[str, ...] = (
    "!markPrice@arr", "!markPrice@arr@1s", "!forceOrder@arr", "!miniTicker@arr", "!ticker@arr",
)  # fmt: skip
"""The futures markets' all-market streams the recorder subscribes (each carries both
markets since 2026-06-30: the drain stores each element in its own market's table)."""

FUTURES_KLINE_INTERVALS: tuple[str, ...] = tuple(interval for interval in KLINE_INTERVALS if interval != "1s")


def is_pair_kind(kind: str) -> bool:
    """Whether a canonical kind (`indexPrice@1s`, `continuousKline_current_quarter_1m`) is named by a pair."""
    return kind_family(kind.partition("@")[0]) in PAIR_KINDS


def pair_stream_name(pair: str, kind: str) -> str:
    """The stream of a pair kind: ("BTCUSDT", "continuousKline_1m") ->
    "btcusdt_perpetual@continuousKline_1m", ("BTCUSDT", "continuousKline_next_quarter_1h")
    -> "btcusdt_next_quarter@continuousKline_1h", ("BTCUSD", "indexPrice") -> "btcusd@indexPrice"."""
    if kind_family(kind) != "continuousKline":
        return f"{pair.lower()}@{kind}"
    name, _, rest = kind.partition("_")
    contract_type, _, interval = rest.rpartition("_")
    return f"{pair.lower()}_{contract_type or CONTRACT_TYPES[0]}@{name}_{interval}"


def stream_subject(stream_name: str) -> str:
    """The symbol or pair a stream is named by, upper-case: "btcusdt@aggTrade" -> "BTCUSDT",
    "btcusdt_perpetual@continuousKline_1m" -> "BTCUSDT" (its pair), the name of an
    all-market stream (`!miniTicker@arr`) itself."""
    if stream_name.startswith("!"):
        return stream_name
    subject = stream_name.partition("@")[0]
    if stream_kind(stream_name) == "continuousKline":
        subject = next((subject.removesuffix(f"_{t}") for t in CONTRACT_TYPES if subject.endswith(f"_{t}")), subject)
    return subject.upper()


def stream_kind(stream_name: str) -> str:
    """The kind part of a stream name, without symbol, interval, time zone or speed.

    "btcusdt@kline_1m" -> "kline", "btcusdt@depth20@100ms" -> "depth20",
    "!miniTicker@arr" -> "miniTicker", "btcusdt@ticker_1h" -> "ticker_1h" (a window
    ticker is another kind than the 24 h ticker), "btcusdt_perpetual@continuousKline_1m"
    -> "continuousKline".
    """
    if stream_name.startswith("!"):  # all-market streams: !<kind>[@arr]
        kind = stream_name[1:].partition("@")[0]
    else:  # <symbol>@<kind>[@<options>]
        kind = stream_name.partition("@")[2].partition("@")[0]
    return kind_family(kind)


def kind_family(kind: str) -> str:
    """ "kline_1m" -> "kline", "continuousKline_1m" -> "continuousKline": a kind streamed
    per interval stands for all its intervals; any other kind is itself."""
    family, underscore, _interval = kind.partition("_")
    return family if underscore and family in KLINE_KINDS else kind


def kind_table(kind: str) -> str:
    """The table of a spot or futures kind, without a market's prefix."""
    return KIND_TABLES.get(kind) or FUTURES_KIND_TABLES[kind]


def validate_stream_kind(kind: str, market: str = "spot") -> str:
    """The canonical spelling of a kind a user asked for in `market`, e.g. "aggtrade" -> "aggTrade".

    Kinds are accepted in any case, intervals only as Binance spells them: "1m" is a
    minute and "1M" a month. An all-market stream (`!miniTicker@arr`) is its own
    stream name, spelled exactly as Binance does. Raises ValueError naming the bad kind
    and the valid ones (of that market).
    """
    spec = market_named(market)
    if kind in spec.all_market_streams:
        return kind
    base, at, speed = kind.partition("@")
    if at:
        return _with_speed(base, speed, kind, spec)
    prefix, underscore, interval = kind.partition("_")
    family = next((k for k in spec.kinds if k in KLINE_KINDS and k.lower() == prefix.lower()), None)
    if family in spec.kinds and underscore:
        contract_type, _, interval = interval.rpartition("_") if family == "continuousKline" else ("", "", interval)
        if interval in spec.kline_intervals and contract_type in ("", *CONTRACT_TYPES):
            return "_".join(part for part in (family, contract_type, interval) if part)
        if interval in spec.kline_intervals:
            raise ValueError(
                f"unknown contract type {contract_type!r} in {kind!r}: use continuousKline_<interval> for the "
                f"perpetual, or continuousKline_<type>_<interval> with a type of {', '.join(CONTRACT_TYPES)}"
            )
        raise ValueError(
            f"unknown kline interval {interval!r} in {kind!r}: use one of {', '.join(spec.kline_intervals)}"
        )
    canonical = {k.lower(): k for k in spec.symbol_kinds if k not in KLINE_KINDS}.get(kind.lower())
    if canonical is None:
        raise ValueError(f"unknown stream kind {kind!r}: use one of {valid_kinds_text(market=spec.name)}")
    return canonical


def _with_speed(base: str, speed: str, kind: str, market: Market) -> str:
    """`depth@100ms`, `depth20@100ms`, futures' `markPrice@1s`: only these kinds have a
    faster variant."""
    canonical = validate_stream_kind(base, market.name)
    if SPEEDS.get(canonical) != speed or canonical not in market.kinds:
        raise ValueError(
            f"unknown stream kind {kind!r}: only {', '.join(k for k in SPEEDS if k in market.kinds)} take a speed, "
            f"and it is {', '.join(sorted({f'@{SPEEDS[k]}' for k in SPEEDS if k in market.kinds}))}"
        )
    return f"{canonical}@{speed}"


def valid_kinds_text(separator: str = ", ", market: str = "spot") -> str:
    """The kinds a user may ask for in `market`, with the kline intervals spelled out, for messages."""
    spec = market_named(market)
    kinds = ", ".join(
        f"{kind}_<interval> ({separator.join(spec.kline_intervals)})" if kind in KLINE_KINDS else kind
        for kind in spec.symbol_kinds
    )
    mark = "".join(f", {kind}@1s" for kind in ("markPrice", "indexPrice") if kind in spec.kinds)
    return (
        f"{kinds} (depth kinds also as <kind>@{FAST_SPEED}{mark}), or all-market {', '.join(spec.all_market_streams)}"
    )


# Markets. A market decides three things, all here: the prefix of its tables (spot has
# none, so existing databases and queries keep their table names; `usdm_trades`,
# `coinm_trades`), the stream kinds it records, and the `st` value Binance's futures
# payloads carry for it. Since 2026-06-30 COIN-M runs on the USDⓈ-M engine and the
# all-market arrays (`!markPrice@arr`, `!ticker@arr`...) carry both markets on either
# host: an event's `st` (1 USDⓈ-M, 2 COIN-M), not its connection, says which market's
# table it belongs to.

SPOT = "spot"
USDM = "usdm"
COINM = "coinm"


@dataclass(frozen=True)
class Market:
    name: str
    table_prefix: str
    kinds: tuple[str, ...]
    """The stream kinds recorded from this market's websocket."""
    rest_tables: tuple[str, ...]
    """Tables (without the prefix) filled from REST only: snapshots, open interest, funding."""
    st: int | None
    """The `st` of this market's futures payloads; None for spot, whose payloads have none."""
    all_market_streams: tuple[str, ...] = ALL_MARKET_STREAMS
    kline_intervals: tuple[str, ...] = KLINE_INTERVALS
    routed: bool = False
    """Whether streams go to the path that carries them (USDⓈ-M's `/public` and `/market`)."""

    @property
    def symbol_kinds(self) -> tuple[str, ...]:
        """The kinds `subscribe` takes for a symbol or pair: all but the market-wide ones."""
        return tuple(kind for kind in self.kinds if kind not in MARKET_WIDE_KINDS)

    def stream_path(self, stream: str) -> str:
        """The websocket path carrying `stream` on this market: USDⓈ-M routes by kind
        (`/public/stream`, `/market/stream`), spot and COIN-M have one `/stream`."""
        if not self.routed:
            return "/stream"
        return "/public/stream" if stream_kind(stream) in PUBLIC_ROUTE_KINDS else "/market/stream"

    def table(self, kind: str) -> str:
        """The table recording `kind` in this market, e.g. ("usdm", "aggTrade") -> "usdm_agg_trades"."""
        if kind not in self.kinds:
            raise ValueError(f"the {self.name} market has no {kind!r} stream: it has {', '.join(self.kinds)}")
        return self.table_prefix + kind_table(kind)

    @property
    def base_tables(self) -> tuple[str, ...]:
        """Every table of this market without its prefix, once each, stream kinds' first."""
        return tuple(dict.fromkeys([*(kind_table(kind) for kind in self.kinds), *self.rest_tables]))

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(self.table_prefix + table for table in self.base_tables)

    @property
    def futures(self) -> bool:
        return self.st is not None

    def gap_kind(self, kind: str) -> str:
        """How the `gaps` table names a kind of this market: spot's as they always were
        (`aggTrade`, `depth`), a futures market's with its name (`usdm:aggTrade`), so that
        one table holds every market's gaps and a symbol listed in two markets keeps two."""
        return kind if self.st is None else f"{self.name}:{kind}"


def split_gap_kind(gap_kind: str) -> tuple[Market, str]:
    """(market, kind) of a `gaps` row's kind, as `Market.gap_kind` wrote it."""
    named, colon, kind = gap_kind.partition(":")
    return (market_named(named), kind) if colon else (MARKETS[SPOT], gap_kind)


# What both futures markets stream. COIN-M's quantities are contracts, its symbols
# `BTCUSD_PERP` and `BTCUSD_251226`; the payloads have the same fields.
_FUTURES_KINDS = (
    "aggTrade", "kline", "ticker", "miniTicker", "bookTicker",
    "depth", "depth5", "depth10", "depth20",
    "markPrice", "forceOrder", "continuousKline",
)  # fmt: skip
_FUTURES_REST_TABLES = ("depth_snapshots", "open_interest", "funding_rates")

MARKETS: dict[str, Market] = {
    SPOT: Market(SPOT, "", SUPPORTED_KINDS, ("depth_snapshots",), st=None),
    # `<s>@trade` is undocumented on USDⓈ-M, but streamed (binance-protocol.md).
    USDM: Market(
        USDM,
        "usdm_",
        (*_FUTURES_KINDS, "trade", "compositeIndex", "contractInfo"),
        _FUTURES_REST_TABLES,
        st=1,
        all_market_streams=(*FUTURES_ALL_MARKET_STREAMS, "!contractInfo"),
        kline_intervals=FUTURES_KLINE_INTERVALS,
        routed=True,
    ),
    COINM: Market(
        COINM,
        "coinm_",
        (*_FUTURES_KINDS, "indexPrice", "markPriceKline", "indexPriceKline"),
        _FUTURES_REST_TABLES,
        st=2,
        all_market_streams=FUTURES_ALL_MARKET_STREAMS,
        kline_intervals=FUTURES_KLINE_INTERVALS,
    ),
}
"""Market name -> its definition; spot first."""

FUTURES_MARKETS: tuple[Market, ...] = (MARKETS[USDM], MARKETS[COINM])

_BY_ST = {market.st: market.name for market in FUTURES_MARKETS}


def market_named(name: str) -> Market:
    """The market called `name`; ValueError naming the valid ones otherwise."""
    try:
        return MARKETS[name]
    except KeyError:
        raise ValueError(f"unknown market {name!r}: use one of {', '.join(MARKETS)}") from None


def market_of_st(st: object) -> str:
    """The market a futures payload's `st` names; ValueError for anything else."""
    name = _BY_ST.get(st) if type(st) is int else None
    if name is None:
        raise ValueError(f"unknown market type st={st!r}: Binance sends 1 (USDⓈ-M) or 2 (COIN-M)")
    return name
