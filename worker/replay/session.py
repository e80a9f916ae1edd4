"""A replay session: the recorded events of a window sent, at the session's clock, to
the websocket clients subscribed to their streams.

One sender walks `events` (read and encoded to JSON on a thread of its own, a batch at
a time, the next batch read while the current one is sent) and hands each frame to
every client that subscribed its stream, awaiting each socket's write: a client whose
buffer is full holds the sender, and so the clock (see `clock`), and no frame is ever
dropped. Frames that go out together (at `max` speed a batch up to the next gap, else
those of one receive time) reach a client in one write of their websocket frames,
not one write each: a write is a system call, and one per frame made the sender the
replay's bottleneck (docs/performance.md, part 9). Where
the recording has a gap, the clients carrying that stream are closed when the clock
reaches it, as Binance's disconnect would (unless gaps are to be sent on).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter

import orjson
from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestHandler
from sqlalchemy import Engine

from fake_binance.wire import websocket_wire
from worker.replay.clock import ReplayClock
from worker.replay.events import Event, events, recorded_symbols
from worker.replay.gaps import ReplayGap, window_gaps
from worker.store.parsing import Payload

BATCH_EVENTS = 2000
"""Events read from the database per hop to the reading thread."""

GAP_CLOSE_CODE = 1001
"""Going away: what a client sees when a recorded disconnect or depth break is replayed."""


@dataclass(frozen=True)
class ReplayWindow:
    """What a session replays: [start_ms, end_ms) of the symbols and stream kinds (None: all)."""

    engine: Engine
    start_ms: int
    end_ms: int
    symbols: list[str] | None
    streams: list[str] | None
    speed: float | None  # None: as fast as the clients read
    close_on_gaps: bool = True


Frame = tuple[int, str, bytes, tuple[str, int, int] | None]
"""An event ready to send: (received_at in ms, stream name, the payload's JSON, and for a
diff its (symbol, `u`, `E`), which /api/v3/depth answers from)."""

_RECEIVED_AT = itemgetter(0)


@dataclass(eq=False)
class Client:
    """One websocket connection: its subscriptions in the order made, whether its
    frames come in the `{"stream", "data"}` envelope (/stream, or SET_PROPERTY combined),
    and the connection's protocol, through which frames are written (None: one at a
    time through the socket)."""

    socket: web.WebSocketResponse
    combined: bool
    streams: list[str] = field(default_factory=list)
    protocol: RequestHandler | None = None

    async def send(self, frames: list[tuple[str, bytes]]) -> None:
        """Send (stream, payload JSON) frames in order, then wait while the connection's
        buffer is full.

        Without compression they go in one write, as whole websocket frames (aiohttp's
        own writes, acknowledgements and pings, are whole frames too, so nothing
        interleaves inside one); a connection that negotiated permessage-deflate gets
        them through aiohttp's writer, which compresses.
        """
        texts = (
            [b'{"stream":"%s","data":%s}' % (stream.encode(), data) for stream, data in frames]
            if self.combined
            else [data for _, data in frames]
        )
        protocol = self.protocol
        transport = None if protocol is None else protocol.transport
        if protocol is None or transport is None or self.socket.compress:
            for text in texts:
                await self.socket.send_frame(text, WSMsgType.TEXT)
            return
        if self.socket.closed or transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(websocket_wire(texts))
        if protocol.writing_paused:  # aiohttp's flow control, what its own send_frame awaits
            await protocol._drain_helper()


class Session:
    """The clock, the clients and the sender of one replay window."""

    def __init__(self, window: ReplayWindow) -> None:
        self.window = window
        self.clock = ReplayClock(window.start_ms, window.speed)
        self.clients: set[Client] = set()
        self.gaps: list[ReplayGap] = window_gaps(window.engine, window.start_ms, window.end_ms, window.symbols)
        self.symbols = window.symbols or recorded_symbols(window.engine, window.start_ms, window.end_ms)
        """The symbols served (exchangeInfo, REST): those asked for, else all recorded in the window."""
        self.frames_sent = 0
        self.finished = False
        self.last_diffs: dict[str, tuple[int, int]] = {}
        """Symbol -> (`u`, `E`) of the last diff the clock passed: /api/v3/depth's lastUpdateId."""
        self._listening = asyncio.Event()  # some client has a subscription
        self._closing: set[asyncio.Task[bool]] = set()  # connections being closed at a gap
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-events")

    def subscribe(self, client: Client, streams: list[str]) -> None:
        """Add streams to a client (after its acknowledgement was sent) and let the clock run."""
        client.streams.extend(stream for stream in streams if stream not in client.streams)
        if client.streams:
            self._listening.set()
            self.clock.start()

    def unsubscribe(self, client: Client, streams: list[str]) -> None:
        client.streams[:] = [stream for stream in client.streams if stream not in streams]
        self._still_listening()

    def forget(self, client: Client) -> None:
        """A client that went away (or was closed at a gap)."""
        self.clients.discard(client)
        self._still_listening()

    def _still_listening(self) -> None:
        if not any(client.streams for client in self.clients):
            self._listening.clear()

    async def run(self) -> None:
        """Send the window, then leave the clock standing at its end."""
        pending_gaps = deque(self.gaps)
        try:
            async for batch in self._batches():
                first = 0
                while first < len(batch):
                    while pending_gaps and pending_gaps[0].begins_ms < batch[first][0]:
                        await self._replay_gap(pending_gaps.popleft())
                    end = self._together(batch, first, pending_gaps)
                    if self.window.speed is None:  # as fast as clients read: none reads, none is sent
                        await self._listening.wait()
                    await self.clock.reach(batch[end - 1][0])
                    await self._send(batch[first:end])
                    first = end
            while pending_gaps:
                await self._replay_gap(pending_gaps.popleft())
            await self.clock.reach(self.window.end_ms)
        finally:
            self._reader.shutdown(wait=False, cancel_futures=True)
        self.finished = True

    def _together(self, batch: list[Frame], first: int, pending_gaps: deque[ReplayGap]) -> int:
        """The end of the frames from `first` on that go out at once: at `max` speed the
        rest of the batch up to the next gap, else those of `first`'s receive time."""
        if self.window.speed is None:
            limit = pending_gaps[0].begins_ms if pending_gaps else batch[-1][0]
        else:
            limit = batch[first][0]
        return bisect.bisect_right(batch, limit, lo=first + 1, key=_RECEIVED_AT)

    async def _send(self, frames: list[Frame]) -> None:
        for _, _, _, diff in frames:
            if diff is not None:
                self.last_diffs[diff[0]] = diff[1:]
        for client in list(self.clients):
            subscribed = set(client.streams)
            mine = [(stream, data) for _, stream, data, _ in frames if stream in subscribed]
            if not mine:
                continue
            try:
                await client.send(mine)
                self.frames_sent += len(mine)
            except ConnectionError:  # it went away while we wrote
                self.forget(client)

    async def _replay_gap(self, gap: ReplayGap) -> None:
        """At the gap's start, close the clients that carry its stream; a client that
        reconnects finds the clock past the gap, where the stream resumes (for depth:
        the first diff on the snapshot recorded after the break)."""
        await self.clock.reach(gap.begins_ms)
        if not self.window.close_on_gaps:
            return
        message = f"recorded gap in {gap.symbol} {gap.kind}".encode()
        for client in [c for c in self.clients if any(gap.affects(stream) for stream in c.streams)]:
            self.forget(client)
            # Not awaited here: a close waits for the client's answer, the other clients need not.
            closing = asyncio.create_task(client.socket.close(code=GAP_CLOSE_CODE, message=message))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        await self.clock.reach(max(gap.begins_ms, gap.ends_ms - 1))

    async def _batches(self) -> AsyncIterator[list[Frame]]:
        """The window's events a batch at a time, the next batch read while one is sent."""
        loop = asyncio.get_running_loop()
        window = self.window
        iterator = await loop.run_in_executor(
            self._reader, events, window.engine, window.start_ms, window.end_ms, window.symbols, window.streams
        )
        read_next = loop.run_in_executor(self._reader, _take, iterator)
        while batch := await read_next:
            read_next = loop.run_in_executor(self._reader, _take, iterator)
            yield batch


SESSION = web.AppKey("replay_session", Session)


def _take(iterator: Iterator[Event]) -> list[Frame]:
    """The next batch of events, encoded (on the reading thread, off the event loop)."""
    return [
        (received_at, stream, orjson.dumps(payload), _diff(payload))
        for received_at, stream, payload in itertools.islice(iterator, BATCH_EVENTS)
    ]


def _diff(payload: Payload) -> tuple[str, int, int] | None:
    return (payload["s"], payload["u"], payload["E"]) if payload.get("e") == "depthUpdate" else None
