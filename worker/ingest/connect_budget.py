"""A connection-attempt budget shared by every group through Redis.

Binance allows 300 connection attempts per 5 minutes per IP. When a network blip
drops every group at once, each one's back-off alone does not keep the sum under the
limit; this sliding-window log in Redis does, for all workers on the same Redis.
"""

from __future__ import annotations

import uuid

import redis

from worker.times import now_ms

WINDOW_SECONDS = 300

# Sliding window: forget attempts older than the window; take one if under the limit,
# else answer how many ms until the oldest attempt leaves the window.
_TAKE = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tonumber(oldest[2]) + window - now
"""


class ConnectBudget:
    def __init__(self, client: redis.Redis, key: str, attempts_per_window: int) -> None:
        self.client = client
        self.key = key
        self.limit = attempts_per_window
        self._take = client.register_script(_TAKE)

    def take(self) -> float:
        """Take one attempt: 0 if allowed now, else the seconds to wait before asking again."""
        wait_ms = self._take(keys=[self.key], args=[now_ms(), WINDOW_SECONDS * 1000, self.limit, uuid.uuid4().hex])
        return int(wait_ms) / 1000
