"""Time, one home: milliseconds since the epoch as Binance sends them, and their text forms.

The service stores every time as integer milliseconds (UTC). People type times on the
command line in several forms (`parse_time`) and read them back in messages in a form
they can paste again (`iso_ms`), or at a glance in tables and logs (`utc_text`).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

_RELATIVE_TIME = re.compile(r"-(\d+)([smhdw])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_SMALLEST_EPOCH_MS = 10**11  # 1973: a smaller number is seconds or a date, not ms
_TIME_FORMS = (
    "an ISO date or datetime (2026-11-24, 2026-11-24T01:00; UTC unless it ends in a zone "
    "such as Z or +02:00), milliseconds since the epoch (1795482000000), now, "
    "or a time ago such as -30m, -2h, -1d"
)


def now_ms() -> int:
    """The wall clock in milliseconds since the epoch, as Binance's event times are."""
    return time.time_ns() // 1_000_000


_wall_clock_ms = now_ms  # for functions whose `now_ms` argument pins "now" in tests


def utc_datetime(ms: int) -> datetime:
    """An aware datetime in UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def utc_text(ms: int | None) -> str:
    """'2026-11-24 01:00:00', for tables and log lines; '-' when unknown."""
    if ms is None:
        return "-"
    return utc_datetime(ms).strftime("%Y-%m-%d %H:%M:%S")


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Milliseconds since the epoch from what a user types on a command line.

    `now_ms` is the reference of "now" and of relative times ("-2h"); tests pin it.
    """
    value = text.strip()
    now = _wall_clock_ms() if now_ms is None else now_ms
    if value.lower() == "now":
        return now
    if relative := _RELATIVE_TIME.fullmatch(value):
        return now - int(relative[1]) * _UNIT_MS[relative[2]]
    if value.isdigit():
        return _epoch_ms(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"cannot read the time {text!r}: use {_TIME_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _ONE_MS  # integers: a float timestamp can lose the last ms


def _epoch_ms(digits: str) -> int:
    value = int(digits)
    if value < _SMALLEST_EPOCH_MS:
        raise ValueError(
            f"{digits} is too small for milliseconds since the epoch (it would be "
            f"{iso_ms(value)}): multiply seconds by 1000, or write a date as 2026-11-24"
        )
    return value


def iso_ms(ms: int) -> str:
    """An ISO time in UTC that `parse_time` reads back, so messages can be copied."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_DURATION = re.compile(r"(\d+)(ms|[smhdw])")


def parse_duration_ms(text: str) -> int:
    """'100ms', '1s', '5m', '1h' -> milliseconds (a step or a window, always > 0)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(f"cannot read the duration {text!r}: use a positive number with ms, s, m, h, d or w, e.g. 1s")
    return int(match[1]) * (1 if match[2] == "ms" else _UNIT_MS[match[2]])


def check_range(start_ms: int, end_ms: int) -> None:
    if start_ms >= end_ms:
        raise ValueError(
            f"the start {iso_ms(start_ms)} is not before the end {iso_ms(end_ms)}: "
            "the start is included and the end excluded, so give an end after the start"
        )
