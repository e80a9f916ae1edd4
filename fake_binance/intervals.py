"""Kline interval arithmetic: which window contains a time, and where the next starts.

Windows are aligned like Binance's: fixed-length intervals (1s ... 3d) on multiples
of their length since the Unix epoch, weeks on Mondays 00:00 UTC, and `1M` on
calendar months in UTC (so a month window is 28 to 31 days long).
"""

from __future__ import annotations

from datetime import UTC, datetime

_SECOND = 1000
_MINUTE = 60 * _SECOND
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR
# The epoch was a Thursday; Monday 1970-01-05 is 4 days later.
_WEEK_ORIGIN = 4 * _DAY

FIXED_MS: dict[str, int] = {
    "1s": _SECOND,
    "1m": _MINUTE,
    "3m": 3 * _MINUTE,
    "5m": 5 * _MINUTE,
    "15m": 15 * _MINUTE,
    "30m": 30 * _MINUTE,
    "1h": _HOUR,
    "2h": 2 * _HOUR,
    "4h": 4 * _HOUR,
    "6h": 6 * _HOUR,
    "8h": 8 * _HOUR,
    "12h": 12 * _HOUR,
    "1d": _DAY,
    "3d": 3 * _DAY,
    "1w": 7 * _DAY,
}
INTERVALS: tuple[str, ...] = (*FIXED_MS, "1M")


def window_start(interval: str, t_ms: int) -> int:
    """Open time of the `interval` window that contains t_ms."""
    if interval == "1M":
        d = _utc(t_ms)
        return _ms(datetime(d.year, d.month, 1, tzinfo=UTC))
    length = FIXED_MS[interval]
    origin = _WEEK_ORIGIN if interval == "1w" else 0
    return (t_ms - origin) // length * length + origin


def next_start(interval: str, open_ms: int) -> int:
    """Open time of the window after the one opening at open_ms."""
    if interval == "1M":
        d = _utc(open_ms)
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return _ms(datetime(year, month, 1, tzinfo=UTC))
    return open_ms + FIXED_MS[interval]


def previous_start(interval: str, open_ms: int) -> int:
    """Open time of the window before the one opening at open_ms."""
    return window_start(interval, open_ms - 1)


def _utc(t_ms: int) -> datetime:
    return datetime.fromtimestamp(t_ms / 1000, tz=UTC)


def _ms(d: datetime) -> int:
    return int(d.timestamp()) * 1000
