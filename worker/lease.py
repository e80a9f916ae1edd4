"""A Redis lease: the one running task allowed to hold a group's connection.

Celery cannot promise that a task runs once (double subscribe, a redelivered message,
a supervisor racing a slow start). The lease can: whoever sets the key first holds the
connection and renews the TTL; any other copy sees the key and exits at once; a task
that dies simply stops renewing, and the group is free again after one TTL.
"""

from __future__ import annotations

import uuid

import redis

from worker.keys import as_text

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, client: redis.Redis, key: str, ttl_seconds: float, owner: str = "") -> None:
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token = f"{owner}:{uuid.uuid4().hex}" if owner else uuid.uuid4().hex
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the lease; False means it was lost and the holder must stop."""
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.token])

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return as_text(value) if value is not None else None
