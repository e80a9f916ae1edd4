"""Keeps one group's connection alive for as long as the group is wanted.

This is what the long-running subscription task does. It holds the group's lease,
flushes received frames to Redis on a steady clock, and tends the connection:

- a connection that ends is replaced after an exponential back-off with full jitter,
  within a connection-attempt budget shared by all groups;
- a connection that is about to reach Binance's 24 h limit, that announced
  `serverShutdown`, or that went silent is rotated make-before-break: the new one is
  opened first and the old one closed only once the new one delivers, so the switch
  leaves no gap (the overlap is deduplicated by the natural keys).

Streams added to or taken from the group while it runs (a later subscribe, an
unsubscribe) are followed on the open connections with SUBSCRIBE / UNSUBSCRIBE,
without reconnecting, so the group's other streams lose nothing.

It stops when the group is unsubscribed (stop flag), when its lease is lost to another
copy, or when the worker shuts down.

Redis trouble never ends it: every Redis call on its path is guarded, frames wait in
memory (up to LOCAL_BUFFER_MAX_FRAMES) and are pushed when Redis answers again. If the
lease cannot be renewed in time, the lease fence (worker/ingest/fence.py) closes the
connections before the lease can expire, and none is opened until it is renewed.
Status records are written only while this copy holds the lease, so a copy that lost
it never overwrites what the holder reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable

import redis

from worker.buffer import FrameBuffer, FrameWriter
from worker.groups import Group, GroupRegistry
from worker.ingest.connect_budget import ConnectBudget
from worker.ingest.fence import LeaseFence
from worker.ingest.session import CLOSE_TIMEOUT_SECONDS, StreamSession
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.settings import Settings
from worker.times import now_ms

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0
# Renewals per lease TTL at most: with the fence at TTL minus its close allowance, a
# renewal may then be late by a few of them before the connections are closed.
RENEWALS_PER_TTL = 6
PROGRESS_SECONDS = 5.0
BACKOFF_BASE_SECONDS = 0.5
# A rotation's new connection that is open but quiet (an illiquid symbol) replaces the
# old one after this long; one that has not even opened by then is given up.
ROTATION_WAIT_SECONDS = 10.0

ALREADY_RUNNING = "another task holds this group's lease"
STOP_REQUESTED = "unsubscribed"
LEASE_LOST = "lease lost to another task"
SHUTTING_DOWN = "worker shutting down"


def backoff_seconds(attempt: int, cap: float) -> float:
    """Exponential back-off with full jitter, so reconnecting groups spread out."""
    return random.uniform(0, min(cap, BACKOFF_BASE_SECONDS * 2**attempt))


class GroupRunner:
    def __init__(
        self,
        group: Group,
        settings: Settings,
        client: redis.Redis,
        shutting_down: Callable[[], bool] = lambda: False,
        report_progress: Callable[[Group, dict[str, object]], None] = lambda group, progress: None,
    ) -> None:
        self.group = group
        self.report_progress = report_progress
        self.settings = settings
        self.keys = RedisKeys(settings.redis_prefix)
        self.registry = GroupRegistry(client, self.keys)
        self.shutting_down = shutting_down
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lease = Lease(client, self.keys.lease(group.id), settings.lease_ttl_seconds, self.owner)
        self.fence = LeaseFence(settings.lease_ttl_seconds, self._close_connections)
        self.budget = ConnectBudget(client, self.keys.connect_attempts, settings.connect_attempts_per_5_minutes)
        self.buffer = FrameBuffer(client, self.keys)
        self.writer = FrameWriter(
            client,
            self.keys,
            group.id,
            settings.local_buffer_max_frames,
            settings.redis_buffer_max_frames,
            market=group.market,
        )
        self.current: StreamSession | None = None
        self.successor: StreamSession | None = None
        self.closing: list[StreamSession] = []
        self.attempt = 0
        self.reconnects = 0
        self.rotations = 0
        self._next_attempt_at = 0.0
        self._next_housekeeping = 0.0
        self._successor_started = 0.0
        self._seen_frames = 0
        self._progress_at = 0.0
        self._next_progress = 0.0
        self._rate_sample = (time.monotonic(), 0)

    def run(self, task_id: str = "") -> str:
        """Run until the group should stop; returns the reason."""
        sent_at = time.monotonic()
        if not self.lease.acquire():
            return ALREADY_RUNNING
        self.fence.renewed(sent_at)
        self.fence.start()
        self.buffer.register(self.group.id, self.group.market)
        self._status(
            state="starting",
            worker=self.owner,
            task_id=task_id,
            streams=len(self.group.streams),
            streams_changed_at="",
            started_at=now_ms(),
            reconnects=0,
            rotations=0,
            last_error="",
        )
        try:
            return self._loop()
        finally:
            self.fence.stop()
            self._close_all()
            self._status(state="stopped", stopped_at=now_ms())
            with contextlib.suppress(redis.RedisError):  # unreleased, it expires after one TTL
                self.lease.release()

    def _loop(self) -> str:
        interval = self.settings.flush_interval_ms / 1000
        next_flush = time.monotonic()
        while True:
            self.writer.flush()
            reason = self._housekeeping()
            if reason:
                return reason
            self._tend_connections(time.monotonic())
            next_flush += interval
            time.sleep(max(0.0, next_flush - time.monotonic()))

    # -- connections -------------------------------------------------------------

    def _tend_connections(self, now: float) -> None:
        self.fence.enforce(now)
        if self.successor is not None:
            self._settle_successor(now)
        if self.current is not None and self.current.ended:
            self._lost(self.current.end_reason, now)
        if self.successor is None and now >= self._next_attempt_at and self.fence.holds(now):
            why = "connecting" if self.current is None else self._rotation_reason(now)
            if why:
                self._open_successor(why, now)
        self.closing = [session for session in self.closing if not session.ended]

    def _rotation_reason(self, now: float) -> str | None:
        current = self.current
        if current is None or current.opened_at is None:
            return None
        if current.server_shutdown:
            return "serverShutdown announced"
        if now - current.opened_at >= self.settings.connection_max_age_seconds:
            return "connection reached its maximum age"
        if current.frames != self._seen_frames:
            self._seen_frames, self._progress_at = current.frames, now
        elif now - max(self._progress_at, current.opened_at) >= self.settings.silence_timeout_seconds:
            return f"no data for {self.settings.silence_timeout_seconds:.0f}s"
        return None

    def _open_successor(self, why: str, now: float) -> None:
        try:
            wait = self.budget.take()
        except redis.RedisError as error:
            self._schedule_retry(f"connection budget unreadable: {type(error).__name__}: {error}", now)
            return
        if wait > 0:
            log.warning("group %s: connection-attempt budget spent; next attempt in %.1fs", self.group.id, wait)
            self._next_attempt_at = now + wait
            self._status(state="throttled")
            return
        if self.current is not None:
            log.info("group %s: rotating (%s)", self.group.id, why)
        session = StreamSession(
            self.settings.ws_url(self.group.market),
            self.group.streams,
            self.writer.pending.append,
            path=self.group.path,
        )
        session.start()
        self.successor, self._successor_started = session, now

    def _settle_successor(self, now: float) -> None:
        """Promote the new connection once it delivers (or, with nothing to replace, once open)."""
        successor = self.successor
        assert successor is not None
        waited = now - self._successor_started
        delivering = successor.frames > 0 or (
            successor.open and (self.current is None or waited > ROTATION_WAIT_SECONDS)
        )
        if delivering and not successor.ended:
            self._promote(successor, now)
        elif successor.ended or waited > ROTATION_WAIT_SECONDS:
            successor.stop("gave up waiting for it to deliver")
            self.closing.append(successor)
            self.successor = None
            self._schedule_retry(successor.end_reason or "new connection did not deliver", now)

    def _promote(self, successor: StreamSession, now: float) -> None:
        old, self.current, self.successor = self.current, successor, None
        self._seen_frames, self._progress_at = successor.frames, now
        self.attempt = 0
        if old is not None:
            old.stop("replaced by a new connection")
            self.closing.append(old)
            self.rotations += 1
        self._status(
            state="connected",
            connected_since=now_ms(),
            reconnects=self.reconnects,
            rotations=self.rotations,
            last_error="",
        )

    def _lost(self, reason: str, now: float) -> None:
        delivered = self.current is not None and self.current.frames > 0
        self.current = None
        self.reconnects += 1
        if delivered:
            self.attempt = 0
        self._schedule_retry(reason, now)

    def _schedule_retry(self, reason: str, now: float) -> None:
        delay = backoff_seconds(self.attempt, self.settings.reconnect_backoff_max_seconds)
        self.attempt += 1
        self._next_attempt_at = now + delay
        log.warning("group %s: %s; next connection attempt in %.1fs", self.group.id, reason, delay)
        self._status(state="reconnecting", last_error=reason, reconnects=self.reconnects)

    def _close_connections(self, reason: str) -> None:
        """Ask every connection to close (from any thread); what they deliver is kept."""
        for session in (self.current, self.successor, *self.closing):
            if session is not None:
                session.stop(reason)

    def _close_all(self) -> None:
        """Close every connection gracefully and flush what they still deliver."""
        sessions = [s for s in (self.current, self.successor, *self.closing) if s is not None]
        for session in sessions:
            session.stop("group stopping")
        for session in sessions:
            session.join(CLOSE_TIMEOUT_SECONDS + 1)
        self.writer.flush()

    # -- lease, stop flag, shutdown --------------------------------------------------

    def _housekeeping(self) -> str | None:
        """About once a second: renew the lease, look for a stop flag, report Redis trouble."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return None
        self._next_housekeeping = now + min(HOUSEKEEPING_SECONDS, self.settings.lease_ttl_seconds / RENEWALS_PER_TTL)
        if self.shutting_down():
            return SHUTTING_DOWN
        try:
            # A lease that expired while Redis was away is taken back if still free.
            if not self.lease.renew() and not self.lease.acquire():
                return LEASE_LOST
            self.fence.renewed(now)
            if self.registry.is_stopped(self.group.id):
                return STOP_REQUESTED
            self._follow_group_changes()
        except redis.RedisError as error:
            log.warning("group %s: Redis unreachable (%s); holding frames in memory", self.group.id, error)
        if self.writer.last_error:
            log.warning(
                "group %s: cannot push to Redis (%s); %d frames held, %d dropped",
                self.group.id,
                self.writer.last_error,
                len(self.writer.pending),
                self.writer.dropped,
            )
        if now >= self._next_progress:
            self._next_progress = now + PROGRESS_SECONDS
            self._publish_progress(now)
        return None

    def _follow_group_changes(self) -> None:
        """Subscribe streams added to the group and unsubscribe those taken out, live."""
        wanted = self.registry.get(self.group.id)
        if wanted is None or wanted.streams == self.group.streams:
            return
        before, after = set(self.group.streams), set(wanted.streams)
        added = [s for s in wanted.streams if s not in before]
        removed = [s for s in self.group.streams if s not in after]
        for session in (self.current, self.successor):
            if session is not None:
                session.change(added, removed)
        self.group = wanted
        log.info("group %s: +%d -%d streams on the open connection", self.group.id, len(added), len(removed))
        # `status` counts a new stream's silence from here, not from the connection's start.
        self._status(streams=len(wanted.streams), streams_changed_at=now_ms())

    def _publish_progress(self, now: float) -> None:
        """Messages per second since the last report, to Redis and to the task's observers."""
        then, pushed_then = self._rate_sample
        self._rate_sample = (now, self.writer.pushed)
        rate = round((self.writer.pushed - pushed_then) / max(now - then, 1e-9), 1)
        self._status(messages_per_second=rate, dropped_locally=self.writer.dropped)
        progress: dict[str, object] = {
            "group": self.group.id,
            "symbols": self.group.symbols,
            "connected": self.current is not None and self.current.open,
            "messages": self.writer.pushed,
            "messages_per_second": rate,
            "reconnects": self.reconnects,
            "rotations": self.rotations,
        }
        try:
            self.report_progress(self.group, progress)
        except Exception as error:
            # The report goes through Celery's result backend and event dispatcher, which
            # raise their own (kombu, redis, socket) errors; a lost report is replaced in
            # 5 s, a lost recording task is a hole in the tickers for ever.
            log.warning("group %s: progress report failed (%s: %s)", self.group.id, type(error).__name__, error)

    def _status(self, **fields: object) -> None:
        """Write the group's status record, only while this copy holds the lease."""
        with contextlib.suppress(redis.RedisError):  # status is informative; recording goes on
            self.registry.set_status_if_holder(self.group.id, self.lease.key, self.lease.token, **fields)
