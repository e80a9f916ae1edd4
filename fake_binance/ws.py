"""Websocket sessions: the handshake, and one connection's life as Binance runs it.

A session owns what is per connection: its stream list and `combined` flag, the
outgoing queue (drained by its own writer task, so one slow client never stalls
the hub), the ping/pong bookkeeping, the incoming-message rate limit and the
lifetime timer. aiohttp runs with autoping off so that pongs are seen and checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from typing import Any

from aiohttp import WSMsgType, web

from fake_binance import commands, streams
from fake_binance.context import CONTEXT, Context
from fake_binance.hub import now_ms
from fake_binance.streams import StreamSpec

# How long a close waits for the client's close frame before dropping the socket.
_CLOSE_TIMEOUT_SECONDS = 2.0
_MAX_INCOMING_BYTES = 1 << 16
_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
_session_ids = itertools.count(1)


async def handle_raw(request: web.Request) -> web.StreamResponse:
    """`[/<route>]/ws` and `[/<route>]/ws/<s1>/<s2>...`: bare payloads."""
    names = request.match_info.get("streams", "").split("/")
    return await _open(request, names, combined=False)


async def handle_combined(request: web.Request) -> web.StreamResponse:
    """`[/<route>]/stream?streams=<s1>/<s2>...`: payloads wrapped with their stream name."""
    return await _open(request, request.query.get("streams", "").split("/"), combined=True)


async def _open(request: web.Request, names: list[str], combined: bool) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    session = Session(ctx, combined, request.match_info.get("route", ""))
    try:
        specs = session.parse_new([n for n in names if n])
    except ValueError as exc:
        return web.json_response({"code": 2, "msg": f"Invalid request: {exc}"}, status=400)
    ws = web.WebSocketResponse(
        autoping=False,
        compress=False,
        timeout=_CLOSE_TIMEOUT_SECONDS,
        max_msg_size=_MAX_INCOMING_BYTES,
    )
    await ws.prepare(request)
    await session.serve(ws, request, specs)
    return ws


class Session:
    """One open stream connection."""

    def __init__(self, ctx: Context, combined: bool, route: str = "") -> None:
        self.id = next(_session_ids)
        self.combined = combined
        self.route = route  # the path's route (USDⓈ-M's "public" or "market"), "" if none
        self.opened_at = now_ms()
        self._ctx = ctx
        self._streams: dict[str, StreamSpec] = {}
        self._outbox: deque[tuple[bytes, str | None, str | None, int | None]] = deque()
        self._wakeup = asyncio.Event()
        self._unanswered_pings: dict[bytes, asyncio.TimerHandle] = {}
        self._incoming: deque[float] = deque()
        self._timers: list[asyncio.TimerHandle] = []
        self._ws: web.WebSocketResponse | None = None
        self._request: web.Request | None = None
        self._closing: asyncio.Task[bool] | None = None

    # -- subscriptions (also the commands.Subscriptions protocol) ----------------

    def stream_names(self) -> list[str]:
        return list(self._streams)

    def parse_new(self, names: list[str]) -> list[StreamSpec]:
        """Specs of the names not yet subscribed; ValueError if invalid or too many."""
        new = {n: self._ctx.venue.parse_stream(n, self.route) for n in names if n not in self._streams}
        limit = self._ctx.config.max_streams_per_connection
        if len(self._streams) + len(new) > limit:
            raise ValueError(f"too many streams: at most {limit} per connection")
        return list(new.values())

    def subscribe(self, names: list[str]) -> None:
        self._attach(self.parse_new(names))

    def unsubscribe(self, names: list[str]) -> None:
        for name in names:
            if self._streams.pop(name, None) is not None:
                self._ctx.hub.detach(self, name)
        self._ctx.hub.note_streamset(self)

    def _attach(self, specs: list[StreamSpec]) -> None:
        for spec in specs:
            self._streams[spec.name] = spec
            self._ctx.hub.attach(self, spec)
        self._ctx.hub.note_streamset(self)

    # -- output -------------------------------------------------------------------

    def deliver(self, stream: bytes, payload: bytes, symbol: str, kind: str, ident: int | None) -> None:
        """Queue one data event (called by the hub for every subscriber)."""
        frame = streams.combined_frame(stream, payload) if self.combined else payload
        self._outbox.append((frame, symbol, kind, ident))
        self._wakeup.set()

    def write_wire(self, data: bytes) -> None:
        """Hand ready-made websocket frames (`wire.frame_header` + payload, whole frames)
        to the transport at once: the market-load mode's path, one write per tick.
        aiohttp's own writes (pings, replies) also write whole frames synchronously, so
        the two never interleave inside a frame."""
        transport = self._request.transport if self._request else None
        if transport is not None and not transport.is_closing() and self._closing is None:
            transport.write(data)

    def _unsent_bytes(self) -> int:
        """Bytes written to the transport that the kernel has not taken yet."""
        transport = self._request.transport if self._request else None
        return transport.get_write_buffer_size() if transport is not None else 0

    def _send_control(self, frame: bytes) -> None:
        self._outbox.append((frame, None, None, None))
        self._wakeup.set()

    async def _write_loop(self, ws: web.WebSocketResponse) -> None:
        record = self._ctx.stats.record_sent
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._outbox:
                frame, symbol, kind, ident = self._outbox.popleft()
                await ws.send_frame(frame, WSMsgType.TEXT)
                record(symbol, kind, ident)

    # -- control by the server ----------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "streams": self.stream_names(),
            "opened_at": self.opened_at,
            "combined": self.combined,
            "route": self.route,
            "unsent_bytes": self._unsent_bytes(),
        }

    def announce_shutdown(self, grace_seconds: float) -> None:
        """Send serverShutdown now, close normally `grace_seconds` later."""
        payload = streams.shutdown_event(now_ms())
        frame = streams.combined_frame(streams.SHUTDOWN_STREAM, payload) if self.combined else payload
        self._send_control(frame)
        self._later(grace_seconds, self.close_soon, 1000, "server shutdown")

    def close_soon(self, code: int = 1000, reason: str = "") -> None:
        """Start a close handshake (idempotent; usable from timer callbacks)."""
        if self._ws is not None and self._closing is None:
            self._closing = asyncio.ensure_future(self._ws.close(code=code, message=reason.encode()))

    def abort(self) -> None:
        """Drop the TCP connection without a close frame, like a network failure."""
        transport = self._request.transport if self._request else None
        if transport is not None:
            transport.abort()

    # -- the connection's life ----------------------------------------------------

    async def serve(self, ws: web.WebSocketResponse, request: web.Request, specs: list[StreamSpec]) -> None:
        self._ws, self._request = ws, request
        cfg = self._ctx.config
        self._ctx.hub.add(self)
        self._attach(specs)
        tasks = [
            asyncio.ensure_future(self._write_loop(ws)),
            asyncio.ensure_future(self._ping_loop(ws)),
        ]
        self._later(cfg.max_connection_seconds, self.close_soon, 1000, "connection lifetime reached")
        try:
            await self._receive_loop(ws)
        finally:
            self._ctx.hub.remove(self)
            for timer in [*self._timers, *self._unanswered_pings.values()]:
                timer.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._closing is not None:
                await asyncio.gather(self._closing, return_exceptions=True)

    async def _receive_loop(self, ws: web.WebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            if msg.type in _ENDED:
                return
            if self._over_rate_limit():
                if self._closing is None:
                    self._ctx.stats.closed_for_rate_limit += 1
                    self.close_soon(1008, "Too many messages")
            elif msg.type is WSMsgType.PING:
                with contextlib.suppress(ConnectionError):  # the peer may be gone already
                    await ws.pong(msg.data)
            elif msg.type is WSMsgType.PONG:
                self._pong_received(bytes(msg.data))
            else:
                self._send_control(commands.handle_request(msg.data, self))

    def _over_rate_limit(self) -> bool:
        """Sliding one-second window over every incoming message, control frames too."""
        now = time.monotonic()
        self._incoming.append(now)
        while self._incoming[0] <= now - 1.0:
            self._incoming.popleft()
        return len(self._incoming) > self._ctx.config.max_incoming_per_second

    async def _ping_loop(self, ws: web.WebSocketResponse) -> None:
        cfg = self._ctx.config
        while True:
            await asyncio.sleep(cfg.ping_interval)
            payload = str(now_ms()).encode()
            await ws.ping(payload)
            self._unanswered_pings[payload] = asyncio.get_running_loop().call_later(
                cfg.pong_timeout, self._pong_missed, payload
            )

    def _pong_received(self, payload: bytes) -> None:
        """Only a pong echoing a ping we sent counts (unsolicited pongs do not)."""
        timer = self._unanswered_pings.pop(payload, None)
        if timer is not None:
            timer.cancel()

    def _pong_missed(self, payload: bytes) -> None:
        if self._unanswered_pings.pop(payload, None) is not None and self._closing is None:
            self._ctx.stats.closed_for_missing_pong += 1
            self.close_soon(1000, "pong timeout")

    def _later(self, seconds: float, callback: Any, *args: Any) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(seconds, callback, *args))


def routes(stream_routes: tuple[str, ...] = ()) -> list[web.RouteDef]:
    """The websocket paths: unrouted ones, and the same under each of `stream_routes`."""
    prefixes = ["", *(f"/{{route:{route}}}" for route in stream_routes)]
    return [
        route
        for prefix in prefixes
        for route in (
            web.get(f"{prefix}/ws", handle_raw),
            web.get(f"{prefix}/ws/{{streams:.+}}", handle_raw),
            web.get(f"{prefix}/stream", handle_combined),
        )
    ]
