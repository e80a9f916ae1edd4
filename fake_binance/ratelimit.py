"""REST request weight, Binance style: 429 with Retry-After, then 418 bans.

Weight is counted per UTC minute. Going over the limit answers 429 and opens a
back-off window until the minute ends; any request inside that window is treated
as ignoring Retry-After and earns an IP ban (418) of `ban_seconds`, during which
every request gets 418. Faults can be injected so a test can check that a client
waits exactly as long as told.
"""

from __future__ import annotations

from dataclasses import dataclass

_MINUTE_MS = 60_000


@dataclass(frozen=True)
class Rejection:
    status: int
    retry_after: int  # seconds
    code: int
    msg: str


class RequestGate:
    """Admits or rejects REST requests; all times are ms since the epoch."""

    def __init__(self, weight_limit: int, ban_seconds: int) -> None:
        self._limit = weight_limit
        self._ban_seconds = ban_seconds
        self._minute = -1
        self._used = 0
        self._backoff_until = 0
        self._ban_until = 0
        self._fault_status = 0
        self._fault_retry_after = 0
        self._fault_count = 0

    @property
    def limit(self) -> int:
        return self._limit

    def used(self, now: int) -> int:
        """Weight used in the UTC minute that contains `now`."""
        return self._used if now // _MINUTE_MS == self._minute else 0

    def inject(self, status: int, count: int, retry_after: int) -> None:
        """Answer the next `count` requests with `status` (429 or 418)."""
        if status not in (429, 418):
            raise ValueError("status must be 429 or 418")
        self._fault_status, self._fault_count, self._fault_retry_after = status, count, retry_after

    def admit(self, weight: int, now: int) -> Rejection | None:
        """None if the request may run (its weight is then counted), else why not."""
        if now < self._ban_until:
            return self._banned(now)
        if now < self._backoff_until:
            self._ban_until = now + self._ban_seconds * 1000
            return self._banned(now)
        if self._fault_count > 0:
            self._fault_count -= 1
            return self._injected(now)
        if now // _MINUTE_MS != self._minute:
            self._minute, self._used = now // _MINUTE_MS, 0
        self._used += weight
        if self._used > self._limit:
            self._backoff_until = (self._minute + 1) * _MINUTE_MS
            return self._too_much(now)
        return None

    def _injected(self, now: int) -> Rejection:
        until = now + self._fault_retry_after * 1000
        if self._fault_status == 418:
            self._ban_until = until
            return self._banned(now)
        self._backoff_until = until
        return self._too_much(now)

    def _too_much(self, now: int) -> Rejection:
        return Rejection(
            429,
            _seconds_until(self._backoff_until, now),
            -1003,
            f"Too much request weight used; current limit is {self._limit} request weight "
            "per 1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
        )

    def _banned(self, now: int) -> Rejection:
        return Rejection(
            418,
            _seconds_until(self._ban_until, now),
            -1003,
            f"Way too much request weight used; IP banned until {self._ban_until}. "
            "Please use WebSocket Streams for live updates to avoid bans.",
        )


def _seconds_until(t: int, now: int) -> int:
    return max(1, -(-(t - now) // 1000))
