"""One combined-stream websocket connection to Binance, receiving in its own thread.

This is the hot path: for every frame it does a deque append, a counter increment and
one prefix check (for `serverShutdown`), nothing else. No JSON parsing, no database,
no Redis round trip per message. Pings are answered by websocket-client itself
(`recv_data` sends the pong echoing the ping's payload), however rarely they come
(spot every 20 s, futures every 3 minutes): the socket's short read timeout only wakes
the loop, and silence is judged by data frames (worker/ingest/runner.py), not pings.

A session runs in a thread so that its owner (worker/ingest/runner.py) can flush on a steady
clock and hold two sessions at once while rotating a connection without a gap.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import websocket

# Streams beyond this many URL characters are added with SUBSCRIBE after connecting,
# so a 1024-stream group does not depend on how long a URL a proxy accepts.
MAX_URL_CHARS = 4000
# Streams per SUBSCRIBE or UNSUBSCRIBE request.
SUBSCRIBE_BATCH = 200
# Binance allows 5 incoming messages per second per connection on spot, 10 on futures
# (pongs count too); stay below both: 4 a second.
SUBSCRIBE_SPACING_SECONDS = 0.25
# How long a closing connection may still deliver the frames that were in flight.
CLOSE_TIMEOUT_SECONDS = 2.0
# How often a blocked receive wakes up to notice a stop request.
RECEIVE_WAKEUP_SECONDS = 0.25

# Bytes read from the socket at once; websocket-client then parses frames from memory.
RECV_CHUNK_BYTES = 64 * 1024

SERVER_SHUTDOWN_PREFIX = b'{"stream":"!serverShutdown"'
_TEXT_OR_BINARY = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)


class ReadAhead:
    """The connection's socket, read RECV_CHUNK_BYTES at a time into one reused buffer.

    websocket-client reads a frame with two or three `recv` calls of exactly the bytes
    it needs (header, extended length, payload). Each is a system call that releases
    the GIL, and each release lets the flushing thread take the GIL and hold it for
    up to a switch interval. Serving those calls from one large read keeps the
    receiving thread on the CPU. `recv_into` a buffer allocated once: a large `recv`
    per read would allocate and shrink a large bytes object each time, which
    fragments the heap. Everything but `recv` is the socket's own.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = memoryview(bytearray(RECV_CHUNK_BYTES))
        self._start = self._end = 0

    def recv(self, size: int) -> bytes:
        if self._start == self._end:
            self._start, self._end = 0, self._sock.recv_into(self._buffer)
        chunk = bytes(self._buffer[self._start : min(self._start + size, self._end)])
        self._start += len(chunk)
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def split_streams_for_url(base_url: str, streams: Sequence[str], path: str = "/stream") -> tuple[str, list[str]]:
    """The connection URL (`path` on `base_url`: `/stream`, or USDⓈ-M's `/public/stream`
    or `/market/stream`) with as many streams as fit, and the streams left to SUBSCRIBE."""
    url = f"{base_url.rstrip('/')}{path}?streams="
    in_url: list[str] = []
    length = len(url)
    for stream in streams:
        length += len(stream) + 1
        if in_url and length > MAX_URL_CHARS:
            break
        in_url.append(stream)
    return url + "/".join(in_url), list(streams[len(in_url) :])


def control_requests(method: str, streams: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(method, streams) requests of at most SUBSCRIBE_BATCH streams each."""
    return [(method, list(streams[i : i + SUBSCRIBE_BATCH])) for i in range(0, len(streams), SUBSCRIBE_BATCH)]


class StreamSession:
    """Connects, receives into `sink` until stopped or the connection ends, then closes.

    Streams that do not fit in the URL, and those the owner adds or removes while the
    connection is open (`change`), go out as SUBSCRIBE / UNSUBSCRIBE requests from the
    receiving thread, one per SUBSCRIBE_SPACING_SECONDS, so the connection never
    exceeds Binance's 5 messages a second and the other streams see no gap.

    The owner reads `frames` (count received), `opened_at`, `server_shutdown` and
    `ended` / `end_reason`; those are plain attributes written by one thread and read
    by another, which the GIL makes safe for these single assignments.
    """

    def __init__(
        self,
        base_url: str,
        streams: Sequence[str],
        sink: Callable[[bytes], None],
        connect_timeout: float = 10.0,
        path: str = "/stream",
    ) -> None:
        self.url, late_streams = split_streams_for_url(base_url, streams, path)
        # Appended by the owner's thread, taken by the receiving thread: deque operations are atomic.
        self._control: deque[tuple[str, list[str]]] = deque(control_requests("SUBSCRIBE", late_streams))
        self._next_control_at = 0.0
        self._request_id = 0
        self.sink = sink
        self.connect_timeout = connect_timeout
        self.frames = 0
        self.opened_at: float | None = None
        self.server_shutdown = False
        self.ended = False
        self.end_reason = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ws-{id(self):x}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: str) -> None:
        """Ask the session to close; it finishes in the background (see `join`)."""
        if not self._stop.is_set():
            self.end_reason = reason
            self._stop.set()

    def change(self, added: Sequence[str], removed: Sequence[str]) -> None:
        """Subscribe `added` and unsubscribe `removed` on this connection, without reconnecting."""
        self._control.extend(control_requests("UNSUBSCRIBE", removed) + control_requests("SUBSCRIBE", added))

    @property
    def control_pending(self) -> int:
        """Requests not sent yet."""
        return len(self._control)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def open(self) -> bool:
        return self.opened_at is not None and not self.ended

    def _run(self) -> None:
        try:
            reason = self._connect_and_receive()
        except (websocket.WebSocketException, OSError) as error:
            reason = f"connection lost: {type(error).__name__}: {error}"
        if not self.end_reason:
            self.end_reason = reason
        self.ended = True

    def _connect_and_receive(self) -> str:
        try:
            ws = websocket.create_connection(self.url, timeout=self.connect_timeout, skip_utf8_validation=True)
        except (websocket.WebSocketException, OSError) as error:
            return f"connect failed: {type(error).__name__}: {error}"
        # After the handshake, which reads byte by byte. websocket-client types `sock` as a
        # socket; ReadAhead offers the socket methods it calls.
        ws.sock = ReadAhead(ws.sock)  # type: ignore[assignment]
        try:
            self.opened_at = time.monotonic()
            return self._receive(ws)
        finally:
            self._close(ws)

    def _receive(self, ws: websocket.WebSocket) -> str:
        ws.settimeout(RECEIVE_WAKEUP_SECONDS)
        sink = self.sink
        recv = ws.recv_data
        stopping = self._stop.is_set
        control = self._control
        while not stopping():
            if control and time.monotonic() >= self._next_control_at:
                self._send_control(ws)
            try:
                opcode, data = recv()
            except websocket.WebSocketTimeoutException:
                continue
            if opcode in _TEXT_OR_BINARY:
                sink(data)
                self.frames += 1
                if data.startswith(SERVER_SHUTDOWN_PREFIX):
                    self.server_shutdown = True
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return "closed by the server"
        return self.end_reason

    def _close(self, ws: websocket.WebSocket) -> None:
        """Close handshake that keeps what was in flight.

        websocket-client's own close() discards data frames that arrive after our
        close frame; those are trades Binance sent and counted as delivered. Reading
        until the server's close frame keeps them.
        """
        try:
            ws.send_close()
            ws.settimeout(CLOSE_TIMEOUT_SECONDS)
            deadline = time.monotonic() + CLOSE_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                opcode, data = ws.recv_data()
                if opcode in _TEXT_OR_BINARY:
                    self.sink(data)
                    self.frames += 1
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
        except (websocket.WebSocketException, OSError):
            pass  # the server went first; nothing more can arrive
        finally:
            ws.shutdown()

    def _send_control(self, ws: websocket.WebSocket) -> None:
        """Send the oldest pending request; Binance answers {"result": null, "id": ...},
        which goes to the sink like any frame and the drain skips."""
        method, streams = self._control.popleft()
        self._request_id += 1
        ws.send(orjson.dumps({"method": method, "params": streams, "id": self._request_id}).decode())
        self._next_control_at = time.monotonic() + SUBSCRIBE_SPACING_SECONDS
