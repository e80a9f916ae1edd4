"""StreamSession's websocket protocol against a real picows server on 127.0.0.1: what
the fake exchange never does (fragmented messages) and the close handshake, from
either side, frame by frame. The fake exchange's streams, pings, rotations and
SUBSCRIBE requests are covered by the whole-stack tests (test_reliability.py,
test_regrouping.py, test_market_subscription.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import picows
import pytest

from worker.ingest.session import StreamSession, environment_proxy

LATE_FRAMES = [b'{"late":1}', b'{"late":2}', b'{"late":3}']


@dataclass
class Server:
    url: str
    pongs: list[bytes] = field(default_factory=list)


class _Peer(picows.WSListener):
    """Sends a message in two fragments and a ping on connecting. On `/stream?streams=close`
    it then closes at once; otherwise it answers the client's close frame with three more
    data frames before its own close, as a server with frames in flight does."""

    def __init__(self, server: Server, closes_first: bool) -> None:
        self.server = server
        self.closes_first = closes_first

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        transport.send(picows.WSMsgType.TEXT, b'{"stream":"a@trade",', fin=False)
        transport.send(picows.WSMsgType.CONTINUATION, b'"data":{}}', fin=True)
        transport.send_ping(b"ping-7")
        if self.closes_first:
            transport.send_close(picows.WSCloseCode.GOING_AWAY)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.PONG:
            self.server.pongs.append(frame.get_payload_as_bytes())
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                for late in LATE_FRAMES:
                    transport.send(picows.WSMsgType.TEXT, late)
                transport.send_close(picows.WSCloseCode.OK)
            transport.disconnect()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    shared = Server(url="")

    def listener(request: picows.WSUpgradeRequest) -> picows.WSListener:
        return _Peer(shared, closes_first=request.path.endswith(b"streams=close"))

    async def start() -> asyncio.Server:
        return await picows.ws_create_server(listener, "127.0.0.1", 0)

    ws_server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    shared.url = f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}"
    yield shared
    loop.call_soon_threadsafe(ws_server.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def wait_for(condition: Callable[[], object], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_fragments_are_joined_pings_answered_and_frames_in_flight_at_the_close_kept(server: Server) -> None:
    got: deque[bytes] = deque()
    session = StreamSession(server.url, ["a@trade"], got.append)
    session.start()
    wait_for(lambda: session.frames and b"ping-7" in server.pongs, "the message and the pong")
    assert list(got) == [b'{"stream":"a@trade","data":{}}']
    session.stop("asked to stop")
    session.join(5)
    assert session.ended and session.end_reason == "asked to stop"
    assert list(got)[1:] == LATE_FRAMES and session.frames == 4


def test_a_close_from_the_server_ends_the_session_with_what_it_sent(server: Server) -> None:
    got: deque[bytes] = deque()
    session = StreamSession(server.url, ["close"], got.append)
    session.start()
    wait_for(lambda: session.ended, "the session to end")
    assert session.end_reason == "closed by the server"
    assert list(got) == [b'{"stream":"a@trade","data":{}}'] and session.opened_at is not None


def test_the_proxy_is_the_environments_as_websocket_client_found_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert environment_proxy("wss://data-stream.binance.vision/stream") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("http_proxy", "socks5://plain.example:1080")
    assert environment_proxy("wss://data-stream.binance.vision/stream") == "http://proxy.example:3128"
    assert environment_proxy("ws://exchange.example/stream") == "socks5://plain.example:1080"
    assert environment_proxy("ws://127.0.0.1:9000/stream") is None
    monkeypatch.setenv("no_proxy", ".binance.vision")
    assert environment_proxy("wss://data-stream.binance.vision/stream") is None
