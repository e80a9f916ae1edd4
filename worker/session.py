"""One combined-stream websocket connection to Binance, feeding a FrameWriter.

This is the hot path: for every frame it does a list append and a clock check, nothing
else. No JSON parsing, no database, no Redis round trip per message; frames go to Redis
in one RPUSH per flush interval. Pings are answered by websocket-client itself
(`recv_data` sends the pong echoing the ping's payload).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import orjson
import websocket

from worker.buffer import FrameWriter

# Streams beyond this many URL characters are added with SUBSCRIBE after connecting,
# so a 1024-stream group does not depend on how long a URL a proxy accepts.
MAX_URL_CHARS = 4000
SUBSCRIBE_BATCH = 200
# Binance allows 5 incoming messages per second per connection; stay well below.
SUBSCRIBE_SPACING_SECONDS = 0.25
# How long a closing connection may still deliver the frames that were in flight.
CLOSE_TIMEOUT_SECONDS = 2.0

_TEXT_OR_BINARY = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)


def split_streams_for_url(base_url: str, streams: Sequence[str]) -> tuple[str, list[str]]:
    """The connection URL with as many streams as fit, and the streams left to SUBSCRIBE."""
    url = f"{base_url.rstrip('/')}/stream?streams="
    in_url: list[str] = []
    length = len(url)
    for stream in streams:
        length += len(stream) + 1
        if in_url and length > MAX_URL_CHARS:
            break
        in_url.append(stream)
    return url + "/".join(in_url), list(streams[len(in_url) :])


class StreamSession:
    """Receives frames until the server closes the connection or `on_tick` says stop.

    `on_tick` runs after every flush (at least every flush interval, also when the
    connection is silent) and returns a reason to stop, or None to go on.
    """

    def __init__(
        self,
        base_url: str,
        streams: Sequence[str],
        writer: FrameWriter,
        flush_interval: float,
        on_tick: Callable[[], str | None],
        connect_timeout: float = 10.0,
    ) -> None:
        self.url, self.late_streams = split_streams_for_url(base_url, streams)
        self.writer = writer
        self.flush_interval = flush_interval
        self.on_tick = on_tick
        self.connect_timeout = connect_timeout

    def connect(self) -> websocket.WebSocket:
        ws = websocket.create_connection(
            self.url, timeout=self.connect_timeout, skip_utf8_validation=True
        )
        self._subscribe_late_streams(ws)
        ws.settimeout(self.flush_interval)
        return ws

    def receive(self, ws: websocket.WebSocket) -> str:
        """The receive loop; returns why it ended. Connection errors propagate."""
        append = self.writer.pending.append
        recv = ws.recv_data
        interval = self.flush_interval
        next_flush = time.monotonic() + interval
        while True:
            try:
                opcode, data = recv()
            except websocket.WebSocketTimeoutException:
                opcode = None
            if opcode in _TEXT_OR_BINARY:
                append(data)
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                return "closed by the server"
            now = time.monotonic()
            if now >= next_flush:
                next_flush = now + interval
                self.writer.flush()
                reason = self.on_tick()
                if reason:
                    return reason

    def close(self, ws: websocket.WebSocket) -> None:
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
                    self.writer.pending.append(data)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
        except (websocket.WebSocketException, OSError):
            pass  # the server went first; nothing more can arrive
        finally:
            ws.shutdown()
            self.writer.flush()

    def _subscribe_late_streams(self, ws: websocket.WebSocket) -> None:
        for request_id, start in enumerate(range(0, len(self.late_streams), SUBSCRIBE_BATCH), 1):
            batch = self.late_streams[start : start + SUBSCRIBE_BATCH]
            ws.send(orjson.dumps({"method": "SUBSCRIBE", "params": batch, "id": request_id}).decode())
            time.sleep(SUBSCRIBE_SPACING_SECONDS)
