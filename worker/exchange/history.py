"""What REST can tell about one symbol's stream kind, as rows of our tables.

A `Series` is the history of one backfillable stream of one market (`btcusdt@trade`,
`@aggTrade`, `@kline_<interval>`, and the futures markets' funding rates): which table
and key column hold it, how far apart consecutive keys are (1 for ids, the interval for
kline open times), and how to fetch a page of it from Binance as row tuples in
`storage.TABLE_COLUMNS` order. Gap detection and both kinds of backfill are written
once against this interface; a market's series fill its tables (`usdm_agg_trades`)
through its REST client (`/fapi/v1/aggTrades`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Table, and_

from worker.exchange.rest import AggTradeRow, BinanceRest, FundingRow, KlineRow, TradeRow
from worker.store.storage import NOT_RECEIVED, TABLE_COLUMNS, TABLES, TIME_COLUMNS
from worker.streams import INTERVAL_MS, SPOT, Market, market_named, validate_stream_kind

Row = tuple[Any, ...]


FUTURES_AGG_TRADES_HISTORY_MS = 48 * INTERVAL_MS["1h"]
"""How far back /fapi/v1/aggTrades and /dapi/v1/aggTrades answer (binance-protocol.md)."""


class NotBackfillable(ValueError):
    """A stream kind that REST cannot backfill; the message names the ones it can."""


class Series(ABC):
    """The history of one symbol's stream kind, keyed by a column with a fixed step."""

    kind: str
    base_table: ClassVar[str]  # without the market's prefix
    key_column: ClassVar[str]
    keys_are: ClassVar[str]  # what the keys are, for messages
    step: int = 1

    def __init__(self, symbol: str, market: str = SPOT) -> None:
        self.symbol = symbol
        self.market: Market = market_named(market)
        self.table_name = self.market.table_prefix + self.base_table
        self.time_column = TIME_COLUMNS[self.table_name]
        columns = TABLE_COLUMNS[self.table_name]
        self.key_index = columns.index(self.key_column)
        self.time_index = columns.index(self.time_column)

    def __repr__(self) -> str:
        return f"{self.symbol}@{self.gap_kind}"

    @property
    def gap_kind(self) -> str:
        """The series' kind in the `gaps` table: with its market's name unless spot."""
        return self.market.gap_kind(self.kind)

    @property
    def table(self) -> Table:
        return TABLES[self.table_name]

    def selects(self) -> ColumnElement[bool]:
        """The WHERE clause of this series' rows in its table."""
        return self.table.c.symbol == self.symbol

    def slots(self, first: int, last: int) -> int:
        """How many keys lie in [first, last] (both on the series' grid)."""
        return (last - first) // self.step + 1

    @abstractmethod
    def fetch(self, rest: BinanceRest, cursor: int, last: int | None, limit: int) -> list[Row]:
        """Up to `limit` rows with key >= `cursor` (and <= `last` where REST can bound
        it), ascending by key, as table rows."""


class TimeRangedSeries(Series):
    """A series REST can also find by time, so that a time range can be backfilled."""

    @abstractmethod
    def keys_between(self, rest: BinanceRest, start_ms: int, end_ms: int) -> tuple[int | None, int | None]:
        """(first key, last key) of the rows with start_ms <= time < end_ms: first None
        when there is none, last None when only the time can tell where they end."""


class TradeSeries(Series):
    kind = "trade"
    base_table = "trades"
    key_column = "trade_id"
    keys_are = "trade ids"

    def fetch(self, rest: BinanceRest, cursor: int, last: int | None, limit: int) -> list[Row]:
        return [trade_row(self.symbol, t) for t in rest.historical_trades(self.symbol, cursor, limit)]


class AggTradeSeries(TimeRangedSeries):
    kind = "aggTrade"
    base_table = "agg_trades"
    key_column = "agg_id"
    keys_are = "aggregate trade ids"

    def fetch(self, rest: BinanceRest, cursor: int, last: int | None, limit: int) -> list[Row]:
        rows = rest.agg_trades(self.symbol, from_id=cursor, limit=limit)
        return [agg_trade_row(self.symbol, a, self.market.futures) for a in rows]

    def keys_between(self, rest: BinanceRest, start_ms: int, end_ms: int) -> tuple[int | None, int | None]:
        """The first id is asked by time, an hour at a time (Binance refuses longer
        time windows); where the rows end only their times tell. The futures APIs serve
        only the last 48 hours: older windows are not asked (each costs weight 20)."""
        if self.market.futures:
            start_ms = max(start_ms, rest.server_time_ms() - FUTURES_AGG_TRADES_HISTORY_MS)
        for window in range(start_ms, end_ms, INTERVAL_MS["1h"]):
            first = rest.agg_trades(
                self.symbol, start_ms=window, end_ms=min(window + INTERVAL_MS["1h"], end_ms) - 1, limit=1
            )
            if first:
                return first[0]["a"], None
        return None, None


class KlineSeries(TimeRangedSeries):
    base_table = "klines"
    key_column = "open_time"
    keys_are = "kline open times"

    def __init__(self, symbol: str, interval: str, market: str = SPOT) -> None:
        super().__init__(symbol, market)
        self.interval = interval
        self.kind = f"kline_{interval}"
        self.step = INTERVAL_MS[interval]

    def selects(self) -> ColumnElement[bool]:
        return and_(super().selects(), self.table.c.interval == self.interval)

    def fetch(self, rest: BinanceRest, cursor: int, last: int | None, limit: int) -> list[Row]:
        rows = rest.klines(self.symbol, self.interval, start_ms=cursor, end_ms=last, limit=limit)
        now = rest.server_time_ms()
        return [kline_row(self.symbol, self.interval, k, now) for k in rows]

    def keys_between(self, rest: BinanceRest, start_ms: int, end_ms: int) -> tuple[int | None, int | None]:
        """Binance returns the klines opening at or after the start, so the bounds
        themselves serve as keys: no request needed."""
        return start_ms, end_ms - 1


FUNDING_KIND = "fundingRate"
MAX_FUNDING_LIMIT = 1000
"""Most fundings Binance returns per request."""


class FundingSeries(TimeRangedSeries):
    """A futures perpetual's funding history (`/fapi/v1/fundingRate`), keyed by funding time.

    Funding times sit on no fixed grid (each symbol's interval is Binance's and changes:
    8 h, 4 h, 1 h), so the step is 1 ms: a page continues after the last funding stored,
    and no gap is ever inferred between two fundings."""

    kind = FUNDING_KIND
    base_table = "funding_rates"
    key_column = "funding_time"
    keys_are = "funding times"

    def fetch(self, rest: BinanceRest, cursor: int, last: int | None, limit: int) -> list[Row]:
        rows = rest.funding_rates(self.symbol, cursor, last, min(limit, MAX_FUNDING_LIMIT))
        return [funding_row(self.symbol, f) for f in rows]

    def keys_between(self, rest: BinanceRest, start_ms: int, end_ms: int) -> tuple[int | None, int | None]:
        return start_ms, end_ms - 1


def series_for(symbol: str, kind: str, market: str = SPOT) -> Series:
    """The series of `market`'s `symbol`'s stream `kind` (any spelling validate_stream_kind
    takes; a futures market also has `fundingRate`).

    Raises ValueError for an unknown kind, interval or market and NotBackfillable for a
    kind REST cannot backfill.
    """
    futures = market_named(market).futures
    if kind == FUNDING_KIND:
        if not futures:
            raise NotBackfillable(f"{FUNDING_KIND} is a futures series: give the market, --market usdm or coinm")
        return FundingSeries(symbol, market)
    kind = validate_stream_kind(kind)
    if kind == "trade" and not futures:
        return TradeSeries(symbol)
    if kind == "aggTrade":
        return AggTradeSeries(symbol, market)
    interval = kind.removeprefix("kline_")
    if kind.startswith("kline_") and interval in INTERVAL_MS and not (futures and interval == "1s"):
        return KlineSeries(symbol, interval, market)
    raise NotBackfillable(
        f"stream kind {kind!r} cannot be backfilled from REST{f' ({market})' if futures else ''}: use "
        + (
            f"aggTrade, {FUNDING_KIND} or kline_<interval> (not 1s, not 1M); futures trades need an API key"
            if futures
            else f"trade, aggTrade or kline_<interval> with an interval of {', '.join(INTERVAL_MS)} (not 1M)"
        )
    )


def series_by_time(symbol: str, kind: str, market: str = SPOT) -> TimeRangedSeries:
    """Like `series_for`, for a kind whose history can be asked by time range."""
    series = series_for(symbol, kind, market)
    if not isinstance(series, TimeRangedSeries):
        raise NotBackfillable(
            f"{kind!r} cannot be backfilled by time: Binance's historicalTrades pages by "
            "id only; use the archive (--source auto) or backfill aggTrade or a kline interval instead"
        )
    return series


def series_of_streams(streams: list[str], market: str = SPOT) -> list[Series]:
    """The backfillable series among `market`'s stream names such as `btcusdt@kline_1m`."""
    found: dict[str, Series] = {}
    for stream in streams:
        symbol, _, kind = stream.partition("@")
        try:
            series = series_for(symbol.upper(), kind, market)
        except ValueError:  # tickers, book tickers, 1M klines: nothing to backfill
            continue
        found.setdefault(repr(series), series)
    return list(found.values())


# Binance's REST rows as table rows. REST has no event time and no receive time (None,
# and `NOT_RECEIVED`: `received_at` and `received_seq` are only for rows from the
# websocket); REST klines carry no
# first/last trade id (None) and are closed once their close time has passed on
# Binance's clock.


def trade_row(symbol: str, t: TradeRow) -> Row:
    return (symbol, t["id"], float(t["price"]), float(t["qty"]), t["time"], t["isBuyerMaker"], None, *NOT_RECEIVED)


def agg_trade_row(symbol: str, a: AggTradeRow, futures: bool = False) -> Row:
    """Futures rows add `normal_qty` (`nq`, when REST sends it) before `NOT_RECEIVED`."""
    row: Row = (symbol, a["a"], float(a["p"]), float(a["q"]), a["f"], a["l"], a["T"], a["m"], None)
    if futures:
        normal_qty = a.get("nq")
        row += (None if normal_qty is None else float(normal_qty),)
    return (*row, *NOT_RECEIVED)


def funding_row(symbol: str, f: FundingRow) -> Row:
    """Older fundings carry no mark price, or an empty one: NULL."""
    mark_price = f.get("markPrice")
    return (
        symbol,
        int(f["fundingTime"]),
        float(f["fundingRate"]),
        float(mark_price) if mark_price else None,
        *NOT_RECEIVED,
    )


def kline_row(symbol: str, interval: str, k: KlineRow, server_now_ms: int) -> Row:
    close_time = int(k[6])
    return (
        symbol, interval, int(k[0]), close_time,
        float(k[1]), float(k[2]), float(k[3]), float(k[4]), float(k[5]), float(k[7]),
        int(k[8]), float(k[9]), float(k[10]),
        None, None, close_time < server_now_ms, None, *NOT_RECEIVED,
    )  # fmt: skip
