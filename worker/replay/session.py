"""A replay session: the recorded events of a window sent, at the session's clock, to
the websocket clients subscribed to their streams.

One sender walks `events` (read on a thread of its own, a batch at a time, the next
batch read while the current one is sent) and hands each frame to every client that
subscribed its stream, awaiting each socket's write: a client whose buffer is full
holds the sender, and so the clock (see `clock`), and no frame is ever dropped. Where
the recording has a gap, the clients carrying that stream are closed when the clock
reaches it, as Binance's disconnect would (unless gaps are to be sent on).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from sqlalchemy import Engine

from worker.replay.clock import ReplayClock
from worker.replay.events import Event, events, recorded_symbols
from worker.replay.gaps import ReplayGap, window_gaps

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


@dataclass(eq=False)
class Client:
    """One websocket connection: its subscriptions in the order made, and whether its
    frames come in the `{"stream", "data"}` envelope (/stream, or SET_PROPERTY combined)."""

    socket: web.WebSocketResponse
    combined: bool
    streams: list[str] = field(default_factory=list)

    async def send(self, stream: str, data: str) -> None:
        text = f'{{"stream":"{stream}","data":{data}}}' if self.combined else data
        await self.socket.send_str(text)


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
                for received_at, stream, payload in batch:
                    while pending_gaps and pending_gaps[0].begins_ms < received_at:
                        await self._replay_gap(pending_gaps.popleft())
                    if self.window.speed is None:  # as fast as clients read: none reads, none is sent
                        await self._listening.wait()
                    await self.clock.reach(received_at)
                    await self._send(stream, payload)
            while pending_gaps:
                await self._replay_gap(pending_gaps.popleft())
            await self.clock.reach(self.window.end_ms)
        finally:
            self._reader.shutdown(wait=False, cancel_futures=True)
        self.finished = True

    async def _send(self, stream: str, payload: dict) -> None:
        if payload.get("e") == "depthUpdate":
            self.last_diffs[payload["s"]] = (payload["u"], payload["E"])
        receivers = [client for client in self.clients if stream in client.streams]
        if not receivers:
            return
        data = orjson.dumps(payload).decode()
        for client in receivers:
            try:
                await client.send(stream, data)
                self.frames_sent += 1
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

    async def _batches(self) -> AsyncIterator[list[Event]]:
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


def _take(iterator: Iterator[Event]) -> list[Event]:
    return list(itertools.islice(iterator, BATCH_EVENTS))
