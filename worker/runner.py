"""Keeps one group's connection alive for as long as the group is wanted.

This is what the long-running subscription task does: hold the group's lease,
connect, receive until the connection ends, reconnect with back-off, and keep a
status record in Redis that the `status` command and Flower users can read. It stops
when the group is unsubscribed (stop flag), when its lease is lost to another copy,
or when the worker shuts down.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable

import redis
import websocket

from worker.buffer import FrameBuffer, FrameWriter, now_ms
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.session import StreamSession
from worker.settings import Settings

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 1.0
BACKOFF_BASE_SECONDS = 0.5

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
    ) -> None:
        self.group = group
        self.settings = settings
        self.client = client
        self.keys = RedisKeys(settings.redis_prefix)
        self.registry = GroupRegistry(client, self.keys)
        self.shutting_down = shutting_down
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lease = Lease(client, self.keys.lease(group.id), settings.lease_ttl_seconds, self.owner)
        self.writer = FrameWriter(
            client,
            FrameBuffer(client, self.keys).register(group.id),
            self.keys.status(group.id),
            settings.local_buffer_max_frames,
        )
        self._next_housekeeping = 0.0
        self._stop_reason: str | None = None

    def run(self) -> str:
        """Run until the group should stop; returns the reason."""
        if not self.lease.acquire():
            return ALREADY_RUNNING
        self.registry.set_status(self.group.id, state="starting", worker=self.owner,
                                 streams=len(self.group.streams), started_at=now_ms())
        try:
            return self._connect_until_stopped()
        finally:
            self.writer.flush()
            self.registry.set_status(self.group.id, state="stopped", stopped_at=now_ms())
            self.lease.release()

    def _connect_until_stopped(self) -> str:
        attempt = 0
        reconnects = 0
        while True:
            session = StreamSession(
                self.settings.binance_ws_url,
                self.group.streams,
                self.writer,
                self.settings.flush_interval_ms / 1000,
                self._tick,
            )
            delivered_before = self._delivered()
            reason = self._run_session(session)
            if reason in (STOP_REQUESTED, LEASE_LOST, SHUTTING_DOWN):
                return reason
            attempt = 0 if self._delivered() > delivered_before else attempt + 1
            reconnects += 1
            delay = backoff_seconds(attempt, self.settings.reconnect_backoff_max_seconds)
            log.warning("group %s: %s; reconnecting in %.1fs", self.group.id, reason, delay)
            self.registry.set_status(self.group.id, state="reconnecting", last_error=reason,
                                     reconnects=reconnects)
            stop = self._sleep(delay)
            if stop:
                return stop

    def _run_session(self, session: StreamSession) -> str:
        try:
            ws = session.connect()
        except (websocket.WebSocketException, OSError) as error:
            return f"connect failed: {error}"
        self.registry.set_status(self.group.id, state="connected", connected_since=now_ms(),
                                 last_error="")
        try:
            return session.receive(ws)
        except (websocket.WebSocketException, OSError) as error:
            return f"connection lost: {type(error).__name__}: {error}"
        finally:
            session.close(ws)

    def _delivered(self) -> int:
        return int(self.registry.status(self.group.id).get("messages", 0))

    def _tick(self) -> str | None:
        """Once a second: renew the lease, look for a stop flag, report Redis trouble."""
        now = time.monotonic()
        if now < self._next_housekeeping:
            return None
        self._next_housekeeping = now + min(HOUSEKEEPING_SECONDS, self.settings.lease_ttl_seconds / 3)
        if self.shutting_down():
            return SHUTTING_DOWN
        try:
            # A lease that expired while Redis was away is taken back if still free.
            if not self.lease.renew() and not self.lease.acquire():
                return LEASE_LOST
            if self.registry.is_stopped(self.group.id):
                return STOP_REQUESTED
        except redis.RedisError as error:
            log.warning("group %s: Redis unreachable (%s); holding frames in memory", self.group.id, error)
        if self.writer.last_error:
            log.warning("group %s: cannot push to Redis (%s); %d frames held, %d dropped",
                        self.group.id, self.writer.last_error, len(self.writer.pending), self.writer.dropped)
        return None

    def _sleep(self, seconds: float) -> str | None:
        """Back-off sleep that keeps the lease and still notices a stop."""
        deadline = time.monotonic() + seconds
        while True:
            reason = self._tick()
            if reason:
                return reason
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(remaining, 0.2))
