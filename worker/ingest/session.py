"""One combined-stream websocket connection to Binance, receiving in its own thread.

This is the hot path: for every frame it does a sink append, a counter increment and
one prefix check (for `serverShutdown`), nothing else. No JSON parsing, no database,
no Redis round trip per message.

The websocket is picows's (Cython), on an asyncio loop of the session's own thread:
its frame parsing costs 0.5 µs of CPU a frame where websocket-client's cost 8.0 and
`websockets`' sync client 4.8 (bench part `1b clients`, docs/performance.md). At the
market mix websocket-client's frame reading was 82 % of the busiest streams process's
receiving thread (py-spy); with picows (and a lighter progress report) the streams
processes take 3.6 µs of CPU a frame at 40,000 msg/s, 13.9 before. picows answers
pings itself, echoing the payload, however rarely they come (spot every 20 s, futures
every 3 minutes); silence is judged by data frames (worker/ingest/runner.py), not pings.

A session runs in a thread so that its owner (worker/ingest/runner.py) can flush on a steady
clock and hold two sessions at once while rotating a connection without a gap.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence

import orjson
import picows

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
# How often the session's loop looks for a stop request and a control request due.
RECEIVE_WAKEUP_SECONDS = 0.25

SERVER_SHUTDOWN_PREFIX = b'{"stream":"!serverShutdown"'
_DATA = (picows.WSMsgType.TEXT, picows.WSMsgType.BINARY, picows.WSMsgType.CONTINUATION)


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


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url`, as websocket-client (the recorder's
    library before picows) found it: `https_proxy` for wss://, `http_proxy` for ws://
    (either case), none for a host in `no_proxy` nor for this machine. picows takes a
    proxy only as an argument."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if host in ("localhost", "127.0.0.1") or urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies_environment().get("https" if parsed.scheme == "wss" else "http")


class _Receiver(picows.WSListener):
    """picows's callbacks for one session: each data message to the session's sink.

    A message split into fragments (a first frame without `fin`, then continuations)
    is joined before it goes on, as Binance's are whole frames but the protocol allows
    fragments; a CLOSE from the server is answered and the connection dropped.
    """

    def __init__(self, session: StreamSession) -> None:
        self.session = session
        self.sink = session.sink
        self.fragments: list[bytes] = []

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type in _DATA:
            data = frame.get_payload_as_bytes()
            if not frame.fin:
                self.fragments.append(data)
                return
            if self.fragments:
                data = b"".join([*self.fragments, data])
                self.fragments.clear()
            self.sink(data)
            session = self.session
            session.frames += 1
            if data.startswith(SERVER_SHUTDOWN_PREFIX):
                session.server_shutdown = True
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(picows.WSCloseCode.OK)
            transport.disconnect()


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
            reason = asyncio.run(self._connect_and_receive())
        except (picows.WSError, OSError) as error:
            reason = f"connection lost: {type(error).__name__}: {error}"
        if not self.end_reason:
            self.end_reason = reason
        self.ended = True

    async def _connect_and_receive(self) -> str:
        try:
            # The whole connect within the timeout: picows's own covers the handshake only, not TCP or TLS.
            transport, _ = await asyncio.wait_for(
                picows.ws_connect(
                    lambda: _Receiver(self),
                    self.url,
                    websocket_handshake_timeout=None,
                    enable_auto_pong=True,
                    proxy=environment_proxy(self.url),
                ),
                self.connect_timeout,
            )
        except (picows.WSError, OSError, TimeoutError) as error:
            return f"connect failed: {type(error).__name__}: {error}"
        disconnected = asyncio.ensure_future(transport.wait_disconnected())
        try:
            self.opened_at = time.monotonic()
            return await self._receive(transport, disconnected)
        finally:
            await self._close(transport, disconnected)

    async def _receive(self, transport: picows.WSTransport, disconnected: asyncio.Future[None]) -> str:
        """Frames arrive in `_Receiver`; this wakes every RECEIVE_WAKEUP_SECONDS to send
        the control request due and to notice a stop request or the connection's end."""
        while not self._stop.is_set():
            if self._control and time.monotonic() >= self._next_control_at:
                self._send_control(transport)
            await asyncio.wait([disconnected], timeout=RECEIVE_WAKEUP_SECONDS)
            if disconnected.done():
                return self._why_disconnected(transport, disconnected)
        return self.end_reason

    @staticmethod
    def _why_disconnected(transport: picows.WSTransport, disconnected: asyncio.Future[None]) -> str:
        error = disconnected.exception()
        if error is not None:
            return f"connection lost: {type(error).__name__}: {error}"
        if transport.close_handshake is not None and transport.close_handshake.recv is not None:
            return "closed by the server"
        return "connection lost: closed without a close frame"

    async def _close(self, transport: picows.WSTransport, disconnected: asyncio.Future[None]) -> None:
        """Close handshake that keeps what was in flight: data frames that arrive after
        our close frame (trades Binance sent and counted as delivered) still go to the
        sink until the server's close frame, for up to CLOSE_TIMEOUT_SECONDS."""
        if not disconnected.done():
            transport.send_close(picows.WSCloseCode.OK)
            await asyncio.wait([disconnected], timeout=CLOSE_TIMEOUT_SECONDS)
        transport.disconnect(graceful=False)  # a peer that reads nothing must not hold the close
        await asyncio.wait([disconnected])
        disconnected.exception()  # a local failure, already reported if it ended the connection

    def _send_control(self, transport: picows.WSTransport) -> None:
        """Send the oldest pending request; Binance answers {"result": null, "id": ...},
        which goes to the sink like any frame and the drain skips."""
        method, streams = self._control.popleft()
        self._request_id += 1
        request = orjson.dumps({"method": method, "params": streams, "id": self._request_id})
        transport.send(picows.WSMsgType.TEXT, request)
        self._next_control_at = time.monotonic() + SUBSCRIBE_SPACING_SECONDS
