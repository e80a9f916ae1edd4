"""The lease fence: a subscription task that cannot renew its lease closes its sockets
before the lease can expire, so another copy never connects while this one still does.

The lease lives in Redis; when Redis is unreachable from this task only (a half-open
link, a failover), another worker may see the lease expire and start a second copy.
Measured before the fence: two live connections for one group for 25 s. The fence
keeps its own clock: a renewal sent at `t` holds the lease until at least `t + ttl` on
Redis's side, so the sockets are told to close at `t + ttl - CLOSE_ALLOWANCE_SECONDS`,
leaving them time for their close handshake (which keeps what was in flight).

A watcher thread does it, because the owner's thread may itself be the one blocked in
a Redis call; the owner also checks `holds()` before it opens a connection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from worker.ingest.session import CLOSE_TIMEOUT_SECONDS, RECEIVE_WAKEUP_SECONDS

log = logging.getLogger(__name__)

# A stop request is seen within one receive wake-up, the close handshake then takes
# at most CLOSE_TIMEOUT_SECONDS.
CLOSE_ALLOWANCE_SECONDS = RECEIVE_WAKEUP_SECONDS + CLOSE_TIMEOUT_SECONDS
WATCH_SECONDS = 0.1


class LeaseFence:
    def __init__(self, ttl_seconds: float, close_all: Callable[[str], None]) -> None:
        # A TTL shorter than twice the allowance is fenced at half the TTL: the close
        # then has less time than it may need, so keep LEASE_TTL_SECONDS above 5.
        self.hold_seconds = ttl_seconds - min(CLOSE_ALLOWANCE_SECONDS, ttl_seconds / 2)
        self.close_all = close_all
        self._valid_until = 0.0
        self._fenced = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lease-fence", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def renewed(self, sent_at: float) -> None:
        """The lease was acquired or renewed by a command sent at `sent_at` (monotonic)."""
        self._valid_until = sent_at + self.hold_seconds
        if self._fenced:
            log.info("lease renewed again; connections may reopen")
        self._fenced = False

    def holds(self, now: float) -> bool:
        return now < self._valid_until

    def enforce(self, now: float) -> None:
        """Close every connection if the lease may expire before another renewal."""
        if not self._fenced and not self.holds(now):
            self._fenced = True
            self.close_all("lease could not be renewed: closing before it expires")

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            self.enforce(time.monotonic())
