"""Binance's REST limits, shared by every worker: the weight budget, 429 back-offs, 418 bans.

Binance counts request weight per IP and per UTC minute, so every process on this
machine spends the same budget; a worker that keeps its own count would let eight
workers use eight budgets. The count therefore lives in Redis: a request reserves its
weight before it is sent, and each answer's `X-MBX-USED-WEIGHT-1M` header raises the
count when other users of the IP spent more than we know. A 429 (back off for
Retry-After seconds) or a 418 (IP ban) is recorded there too, so that every worker
waits, not only the one that was told: the next request of any of them during a
back-off would earn the ban.

Binance keeps two such budgets per IP: spot's (`/api`) and the futures one that `/fapi`
and `/dapi` share (2,400 a minute since COIN-M moved onto the USDⓈ-M engine). Each is a
pool here ("" and "futures"), with its own keys, count and bans: spending one never
slows the other.

Without Redis (a one-off call such as checking symbols) a process-local state does
the same for the calling process alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import redis

from worker.keys import RedisKeys
from worker.times import utc_text

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
# Keys outlive their minute a little, so that a slow clock still finds its count.
_WEIGHT_KEY_TTL_MS = 2 * MINUTE_MS

BACKOFF = "backoff"
"""Binance answered 429: nobody may send a request until Retry-After has passed."""
BAN = "ban"
"""Binance answered 418: the IP is banned until Retry-After has passed."""


class RestUnavailable(RuntimeError):
    """Binance cannot be asked now (a long ban, or repeated failures); the message says
    until when and what to do. The request was not sent, or failed every attempt."""


class LimitState(Protocol):
    """Where the weight counts and the back-off/ban deadlines are kept."""

    def reserve(self, minute: int, weight: int, budget: int) -> bool:
        """Add `weight` to the minute's count unless that would exceed `budget`.

        A request heavier than the whole budget is admitted into an empty minute, so a
        small budget slows such requests down instead of blocking them for ever.
        """

    def raise_used(self, minute: int, used: int) -> None:
        """Set the minute's count to `used` if that is higher (Binance's own count)."""

    def used(self, minute: int) -> int:
        """The minute's count."""

    def block(self, kind: str, until_ms: int, now_ms: int) -> None:
        """Nobody may send a request before `until_ms` (a later deadline wins)."""

    def blocked_until(self) -> tuple[int, str]:
        """The latest deadline recorded (ms, BACKOFF or BAN); one in the past is over."""


_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local weight = tonumber(ARGV[1])
if used > 0 and used + weight > tonumber(ARGV[2]) then
  return 0
end
redis.call('INCRBY', KEYS[1], weight)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

_RAISE_TO = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
"""


class RedisLimitState:
    """The state of one budget pool in Redis, shared by all workers; every update is one
    atomic script."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, pool: str = "") -> None:
        self.client = client
        self.keys = keys
        self.pool = pool
        self._reserve = client.register_script(_RESERVE)
        self._raise_to = client.register_script(_RAISE_TO)

    def reserve(self, minute: int, weight: int, budget: int) -> bool:
        key = self.keys.rest_weight(minute, self.pool)
        return bool(self._reserve(keys=[key], args=[weight, budget, _WEIGHT_KEY_TTL_MS]))

    def raise_used(self, minute: int, used: int) -> None:
        self._raise_to(keys=[self.keys.rest_weight(minute, self.pool)], args=[used, _WEIGHT_KEY_TTL_MS])

    def used(self, minute: int) -> int:
        return int(self.client.get(self.keys.rest_weight(minute, self.pool)) or 0)

    def block(self, kind: str, until_ms: int, now_ms: int) -> None:
        # The key expires with its deadline: a stale ban never outlives itself.
        ttl_ms = max(1, until_ms - now_ms)
        self._raise_to(keys=[self._block_key(kind)], args=[until_ms, ttl_ms])

    def blocked_until(self) -> tuple[int, str]:
        backoff, ban = self.client.mget(self._block_key(BACKOFF), self._block_key(BAN))
        return max((int(backoff or 0), BACKOFF), (int(ban or 0), BAN))

    def _block_key(self, kind: str) -> str:
        return self.keys.rest_banned_until(self.pool) if kind == BAN else self.keys.rest_backoff_until(self.pool)


class LocalLimitState:
    """The state in this process only, for code paths that have no Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._minute = -1
        self._used = 0
        self._blocked: dict[str, int] = {BACKOFF: 0, BAN: 0}

    def reserve(self, minute: int, weight: int, budget: int) -> bool:
        with self._lock:
            used = self._used_in(minute)
            if used > 0 and used + weight > budget:
                return False
            self._minute, self._used = minute, used + weight
            return True

    def raise_used(self, minute: int, used: int) -> None:
        with self._lock:
            if minute >= self._minute and used > self._used_in(minute):
                self._minute, self._used = minute, used

    def used(self, minute: int) -> int:
        with self._lock:
            return self._used_in(minute)

    def block(self, kind: str, until_ms: int, now_ms: int) -> None:
        with self._lock:
            self._blocked[kind] = max(self._blocked[kind], until_ms)

    def blocked_until(self) -> tuple[int, str]:
        with self._lock:
            return max((until, kind) for kind, until in self._blocked.items())

    def _used_in(self, minute: int) -> int:
        return self._used if minute == self._minute else 0


FUTURES_POOL = "futures"
PROCESS_STATES: dict[str, LocalLimitState] = {"": LocalLimitState(), FUTURES_POOL: LocalLimitState()}
"""The state of every client in this process that was given no Redis, per budget pool."""
PROCESS_STATE = PROCESS_STATES[""]


@dataclass
class RequestPacer:
    """Decides when a request may be sent, and waits until then.

    `clock` (seconds since the epoch) and `sleep` are injectable so that tests can
    check a wait of most of a minute without sleeping through it.
    """

    state: LimitState
    budget_per_minute: int = 3000
    max_wait_seconds: float = 300.0
    budget_setting: str = "REST_WEIGHT_BUDGET_PER_MINUTE"
    """The setting that sets this pool's budget, named in messages."""
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def before_request(self, weight: int) -> None:
        """Wait out any back-off or ban, then reserve `weight` in this minute's budget,
        waiting for the next minute while the budget is spent."""
        while True:
            now = self.now_ms()
            until, kind = self.state.blocked_until()
            if until > now:
                self._wait_blocked(until - now, until, kind)
                continue
            if self.state.reserve(now // MINUTE_MS, weight, self.budget_per_minute):
                return
            wait_ms = MINUTE_MS - now % MINUTE_MS
            log.info(
                "REST weight budget of %d per minute (%s) spent; waiting %.1f s for the next minute",
                self.budget_per_minute,
                self.budget_setting,
                wait_ms / 1000,
            )
            self.sleep(wait_ms / 1000)

    def after_response(self, headers: Mapping[str, str]) -> None:
        """Take Binance's count of the IP's weight when it is higher than ours."""
        used = headers.get(USED_WEIGHT_HEADER)
        if used is not None and used.isdigit():
            self.state.raise_used(self.now_ms() // MINUTE_MS, int(used))

    def block(self, kind: str, retry_after_seconds: float) -> None:
        """Record a 429 back-off or a 418 ban for every worker."""
        now = self.now_ms()
        until = now + int(retry_after_seconds * 1000)
        log.warning(
            "Binance answered %s: no REST request until %s (%.0f s)",
            "418 (IP ban)" if kind == BAN else "429 (too much weight)",
            utc_text(until) + " UTC",
            retry_after_seconds,
        )
        self.state.block(kind, until, now)

    def used_this_minute(self) -> int:
        return self.state.used(self.now_ms() // MINUTE_MS)

    def has_room(self, weight: int) -> bool:
        """Whether a request of `weight` would be sent now, without waiting out a back-off,
        a ban or the next minute (the rule of `LimitState.reserve`). A caller with much
        to fetch, such as the depth snapshots of many books, asks this first and leaves
        the rest for a later run, rather than holding a worker asleep for many minutes."""
        now = self.now_ms()
        if self.state.blocked_until()[0] > now:
            return False
        used = self.state.used(now // MINUTE_MS)
        return used == 0 or used + weight <= self.budget_per_minute

    def _wait_blocked(self, wait_ms: int, until: int, kind: str) -> None:
        what = "banned this IP (HTTP 418)" if kind == BAN else "asked us to back off (HTTP 429)"
        if wait_ms > self.max_wait_seconds * 1000:
            raise RestUnavailable(
                f"Binance {what} until {utc_text(until)} UTC, {wait_ms / 1000:.0f} s from now, longer than "
                f"REST_MAX_WAIT_SECONDS={self.max_wait_seconds:g}; retry after that time "
                f"(and lower {self.budget_setting} if it happens again)"
            )
        log.info("Binance %s; waiting %.1f s", what, wait_ms / 1000)
        self.sleep(wait_ms / 1000)
