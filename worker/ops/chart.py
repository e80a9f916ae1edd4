"""A PNG chart of one symbol over a time range: price above, volume below.

The chart shows the window asked for, drawn from the recorded data that covers most of
it: klines of the interval asked for, else of the finest interval, else trades, unless
another of them covers more of the window (a stream subscribed for a minute long ago
must not hide ten minutes of trades). The summary says which, and how much it covers. Either way
the database groups the rows into at most about one bucket per four pixels of width, so
a chart of a month of trades reads a few hundred rows, not millions, and stays legible.

Rendering uses matplotlib's Agg canvas directly, without pyplot: no GUI backend is ever
chosen, and no figure is kept in pyplot's global registry, which would leak in a
long-running worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import matplotlib.dates as mdates
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sqlalchemy import ColumnElement, Connection, Engine, Select, and_, func, select

from worker.ops.export import (
    Source,
    check_directory,
    no_rows_message,
    resolve_source,
)
from worker.store.storage import TABLES, TIME_COLUMNS
from worker.streams import INTERVAL_MS, SPOT, Market, market_named
from worker.times import check_range, utc_datetime

DAY_MS = 86_400_000

CANDLE_MS: dict[str, int] = {**INTERVAL_MS, "1M": 28 * DAY_MS}
"""Bucket length per kline interval. A month is 28 to 31 days; 28 days puts no two
monthly open times in one bucket, which is all the grouping needs."""

_NICE_STEPS_MS = sorted({1000, 2000, 5000, 10_000, 15_000, 30_000, 600_000, *INTERVAL_MS.values()})
_TRADE_BASE_MS = 1000  # trades are bucketed per second at the finest
_PIXELS_PER_POINT = 4
_DPI = 100
_MIN_PX, _MAX_PX = (400, 300), (10_000, 10_000)
_UP, _DOWN, _LINE = "#26a69a", "#ef5350", "#1f77b4"
# The date under the time axis' right end, saying UTC there rather than in an axis label,
# which collides with that date on narrow charts.
_OFFSET_FORMATS = ["UTC", "%Y UTC", "%Y-%b UTC", "%Y-%b-%d UTC", "%Y-%b-%d UTC", "%Y-%b-%d %H:%M UTC"]


@dataclass(frozen=True)
class ChartSummary:
    """What was drawn: the file, where the prices came from, and the buckets plotted."""

    path: Path
    source: str  # "klines 1m" or "trades"
    points: int
    covered_ms: int  # how much of the window the source's rows span
    window_ms: int

    def describe(self, width_px: int, height_px: int) -> str:
        coverage = f"{self.covered_ms / self.window_ms:.0%}" if self.covered_ms < self.window_ms else "all"
        return (
            f"{self.path}: {width_px}x{height_px} PNG from {self.source} (the data covering most of the "
            f"window: {coverage} of it), {self.points} points"
        )


@dataclass(frozen=True)
class _Spec:
    """Which columns make a bucket's OHLCV, and the key whose first and last row in a
    bucket give its open and close (trade ids order trades within a millisecond)."""

    key: str
    open: str
    high: str
    low: str
    close: str
    volume: str


_SPECS = {
    "klines": _Spec("open_time", "open", "high", "low", "close", "volume"),
    "trades": _Spec("trade_id", "price", "price", "price", "price", "qty"),
    "agg_trades": _Spec("agg_id", "price", "price", "price", "price", "qty"),
}
_TRADE_TABLES = ("trades", "agg_trades")
"""The tables a chart falls back to when no klines cover the window, in preference
order (a futures market is usually recorded by aggTrade; COIN-M has no trade stream)."""


@dataclass(frozen=True)
class _Buckets:
    """One row per bucket: when it starts (ms) and its OHLCV, as arrays."""

    time_ms: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    step_ms: int


def draw_chart(
    engine: Engine,
    symbol: str,
    start_ms: int,
    end_ms: int,
    path: str | Path,
    width_px: int = 1200,
    height_px: int = 700,
    interval: str | None = None,
    market: str = SPOT,
) -> ChartSummary:
    """Draw `symbol` of `market` from start_ms (included) to end_ms (excluded) into a PNG
    of exactly width_px x height_px; raise ValueError saying why when there is nothing to draw."""
    symbol = symbol.strip().upper()
    check_range(start_ms, end_ms)
    _check_size(width_px, height_px)
    preferred = resolve_source("klines", interval, market).interval
    target = Path(path)
    check_directory(target)
    max_points = width_px // _PIXELS_PER_POINT
    with engine.connect() as conn:
        source, covered = _chart_source(conn, symbol, start_ms, end_ms, preferred, market_named(market))
        buckets = _load_buckets(conn, source, symbol, start_ms, end_ms, max_points)
    title = f"{symbol} — {_describe(source, buckets.step_ms)}, {_range_text(start_ms, end_ms)}"
    _render(buckets, source.base == "klines", title, target, width_px, height_px, (start_ms, end_ms))
    return ChartSummary(target, source.label, len(buckets.time_ms), covered, end_ms - start_ms)


def _check_size(width_px: int, height_px: int) -> None:
    if not (_MIN_PX[0] <= width_px <= _MAX_PX[0] and _MIN_PX[1] <= height_px <= _MAX_PX[1]):
        raise ValueError(
            f"a chart of {width_px}x{height_px} pixels cannot be drawn: give a width of "
            f"{_MIN_PX[0]} to {_MAX_PX[0]} and a height of {_MIN_PX[1]} to {_MAX_PX[1]}"
        )


def _chart_source(
    conn: Connection, symbol: str, start_ms: int, end_ms: int, preferred: str | None, market: Market
) -> tuple[Source, int]:
    """The source whose rows span most of the window, and that span (ms).

    Candidates in order of preference: the interval asked for, the kline intervals
    from the smallest up, trades, aggregate trades (those the market records); a later
    one wins only by covering more. One indexed min/max per candidate.
    """
    intervals = dict.fromkeys([preferred, *market.kline_intervals])
    trades = [Source(base, market=market.name) for base in _TRADE_TABLES if market.table_prefix + base in TABLES]
    candidates = [Source("klines", i, market.name) for i in intervals if i] + trades
    best, best_covered = None, 0
    for source in candidates:
        covered = _covered_ms(conn, source, symbol, start_ms, end_ms)
        if covered > best_covered:
            best, best_covered = source, covered
    if best is None:
        klines = no_rows_message(conn, Source("klines", market=market.name), symbol, start_ms, end_ms)
        raise ValueError(
            f"nothing to chart: {klines}"
            + "".join(f"; and {no_rows_message(conn, source, symbol, start_ms, end_ms)}" for source in trades)
        )
    return best, best_covered


def _covered_ms(conn: Connection, source: Source, symbol: str, start_ms: int, end_ms: int) -> int:
    """How much of [start_ms, end_ms) the source's rows span (a kline spans its interval)."""
    time_column = TABLES[source.table].c[TIME_COLUMNS[source.table]]
    first, last = conn.execute(
        select(func.min(time_column), func.max(time_column)).where(
            *source.filters(symbol), *source.in_range(start_ms, end_ms)
        )
    ).one()
    if first is None:
        return 0
    length = CANDLE_MS[source.interval] if source.interval else _TRADE_BASE_MS
    return min(last + length, end_ms) - max(first, start_ms)


def _load_buckets(
    conn: Connection, source: Source, symbol: str, start_ms: int, end_ms: int, max_points: int
) -> _Buckets:
    table = TABLES[source.table]
    time_column = table.c[TIME_COLUMNS[source.table]]
    first, last = conn.execute(
        select(func.min(time_column), func.max(time_column)).where(
            *source.filters(symbol), *source.in_range(start_ms, end_ms)
        )
    ).one()
    base = CANDLE_MS[source.interval] if source.interval else _TRADE_BASE_MS
    step = _step_ms(last + base - first, base, max_points)
    rows = conn.execute(_bucket_statement(source, symbol, start_ms, end_ms, step)).all()
    columns = np.array(rows, dtype=float).T
    bucket, first_time, open_, high, low, close, volume = columns
    # A candle starts at its first kline's open time: weekly and monthly klines do not
    # start at multiples of their length since the epoch. Trade buckets start on the grid.
    starts = first_time if source.base == "klines" else bucket * step
    return _Buckets(starts.astype(np.int64), open_, high, low, close, volume, step_ms=step)


def _step_ms(span_ms: int, base_ms: int, max_points: int) -> int:
    """The shortest round bucket length, a multiple of `base_ms`, that splits the span
    into at most `max_points` buckets."""
    for step in _NICE_STEPS_MS:
        if step >= base_ms and step % base_ms == 0 and span_ms / step <= max_points:
            return step
    return base_ms * math.ceil(span_ms / (base_ms * max_points))


def _bucket_statement(source: Source, symbol: str, start_ms: int, end_ms: int, step_ms: int) -> Select[Any]:
    """Per bucket: its number, first time, and OHLCV; open and close are read from the
    bucket's first and last row, found again by key, so that SQLite and PostgreSQL both
    answer it (neither has a portable first()/last() aggregate)."""
    table = TABLES[source.table]
    spec = _SPECS[source.base]
    time_column = table.c[TIME_COLUMNS[source.table]]
    bucket = (time_column // step_ms).label("bucket")
    grouped = (
        select(
            bucket,
            func.min(time_column).label("first_time"),
            func.min(table.c[spec.key]).label("first_key"),
            func.max(table.c[spec.key]).label("last_key"),
            func.max(table.c[spec.high]).label("high"),
            func.min(table.c[spec.low]).label("low"),
            func.sum(table.c[spec.volume]).label("volume"),
        )
        .where(*source.filters(symbol), *source.in_range(start_ms, end_ms))
        .group_by(bucket)
        .subquery()
    )
    first_row, last_row = table.alias("first_row"), table.alias("last_row")
    return (
        select(
            grouped.c.bucket,
            grouped.c.first_time,
            first_row.c[spec.open],
            grouped.c.high,
            grouped.c.low,
            last_row.c[spec.close],
            grouped.c.volume,
        )
        .select_from(grouped)
        .join(first_row, _same_row(first_row, source, symbol, spec.key, grouped.c.first_key))
        .join(last_row, _same_row(last_row, source, symbol, spec.key, grouped.c.last_key))
        .order_by(grouped.c.bucket)
    )


def _same_row(alias: Any, source: Source, symbol: str, key: str, value: Any) -> ColumnElement[bool]:
    conditions = [alias.c.symbol == symbol, alias.c[key] == value]
    if source.interval:
        conditions.append(alias.c.interval == source.interval)
    return and_(*conditions)


def _describe(source: Source, step_ms: int) -> str:
    if source.base in _TRADE_TABLES:
        return f"{source.label}, last price and volume per {_duration(step_ms)}"
    if source.interval and step_ms == CANDLE_MS[source.interval]:
        return source.label
    return f"{source.label} as {_duration(step_ms)} candles"


def _duration(ms: int) -> str:
    for unit, length in (("d", DAY_MS), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % length == 0:
            return f"{ms // length}{unit}"
    return f"{ms}ms"


def _range_text(start_ms: int, end_ms: int) -> str:
    start, end = utc_datetime(start_ms), utc_datetime(end_ms)
    end_format = "%H:%M:%S" if end.date() == start.date() else "%Y-%m-%d %H:%M:%S"
    return f"{start:%Y-%m-%d %H:%M:%S} – {end.strftime(end_format)} UTC"


def _render(
    buckets: _Buckets, candles: bool, title: str, path: Path, width_px: int, height_px: int, window: tuple[int, int]
) -> None:
    figure = Figure(figsize=(_inches(width_px), _inches(height_px)), dpi=_DPI, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    price_axes, volume_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    x = mdates.date2num(buckets.time_ms.astype("datetime64[ms]"))
    width = buckets.step_ms / DAY_MS  # matplotlib's dates count days
    colors = np.where(buckets.close >= buckets.open, _UP, _DOWN)
    (_draw_candles if candles else _draw_price_line)(price_axes, x, width, buckets, colors)
    volume_axes.bar(x + 0.1 * width, buckets.volume, width=0.8 * width, align="edge", color=colors)
    window_x = mdates.date2num(np.array(window, dtype="datetime64[ms]"))
    _style(price_axes, volume_axes, title, (window_x[0], window_x[1]))
    # print_png renders at the figure's size and dpi; savefig would honour a user's
    # matplotlibrc `savefig.bbox: tight` and change the size.
    canvas.print_png(path)


def _inches(px: int) -> float:
    """Agg truncates inches x dpi to whole pixels, and 701 / 100 * 100 is 700.999...:
    nudge such sizes up by the smallest float so the image has exactly `px` pixels."""
    inches = px / _DPI
    return inches if int(inches * _DPI) == px else math.nextafter(inches, math.inf)


def _draw_candles(axes: Axes, x: np.ndarray, width: float, buckets: _Buckets, colors: np.ndarray) -> None:
    axes.vlines(x + width / 2, buckets.low, buckets.high, colors=list(colors), linewidth=1)
    axes.bar(
        x + 0.1 * width,
        np.abs(buckets.close - buckets.open),
        bottom=np.minimum(buckets.open, buckets.close),
        width=0.8 * width,
        align="edge",
        color=colors,
        edgecolor=colors,  # a candle that closes at its open is still a visible line
        linewidth=0.6,
    )


def _draw_price_line(axes: Axes, x: np.ndarray, width: float, buckets: _Buckets, colors: np.ndarray) -> None:
    middle = x + width / 2
    axes.fill_between(middle, buckets.low, buckets.high, color=_LINE, alpha=0.2, linewidth=0, label="low – high")
    axes.plot(
        middle,
        buckets.close,
        color=_LINE,
        linewidth=1.2,
        label="last price",
        marker="o" if len(x) <= 60 else None,
        markersize=3,
    )
    axes.legend(loc="best", fontsize="small")


def _style(price_axes: Axes, volume_axes: Axes, title: str, x_limits: tuple[float, float]) -> None:
    price_axes.set_title(title, wrap=True)  # narrow charts break the title instead of clipping it
    price_axes.set_ylabel("price")
    price_axes.ticklabel_format(axis="y", style="plain", useOffset=False)
    volume_axes.set_ylabel("volume")
    volume_axes.set_xlim(*x_limits)
    locator = mdates.AutoDateLocator(tz=UTC)
    volume_axes.xaxis.set_major_locator(locator)
    volume_axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC, offset_formats=_OFFSET_FORMATS))
    for axes in (price_axes, volume_axes):
        axes.grid(True, color="#dddddd", linewidth=0.6)
        axes.set_axisbelow(True)
