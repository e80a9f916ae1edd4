"""The receivers the benchmark compares, each run alone in its own process.

    python -m bench.receivers bare --url WS_URL --frames N [--library websockets-sync]
    python -m bench.receivers recorder --group-id G --streams S1,S2   (REDIS_URL, BINANCE_WS_URL)
    python -m bench.receivers legacy --url WS_URL --db FILE --seconds S [--frames N] [--rest-url URL]

Each prints one line of JSON. A process per receiver keeps them from sharing a GIL
with the benchmark's own polling, and gives every run the same cold start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis
import requests
import websocket

from worker.groups import Group
from worker.ingest.runner import GroupRunner
from worker.settings import Settings

# A receive that waits this long means the sender is gone: the run ends with what it got.
RECEIVE_TIMEOUT_SECONDS = 10.0
LEGACY_POLL_SECONDS = 1.0
_DATA = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY)
_REST_LATEST = {"trade": ("/api/v3/trades", "id"), "aggTrade": ("/api/v3/aggTrades", "a")}


class Tally:
    """Frames received, and the wall and CPU clocks from the first frame to the last.

    CPU is the whole process's (every thread's: websockets' sync client reads in a
    thread of its own), user plus system, so it includes the kernel's socket work.
    Made before connecting: `first_after_connect` is the time from opening the
    connection to the first frame (how soon a replay starts sending).
    """

    def __init__(self) -> None:
        self.frames = 0
        self._connecting = time.perf_counter()
        self._first_wall = self._first_cpu = 0.0

    def add(self) -> None:
        if not self.frames:
            self._first_wall, self._first_cpu = time.perf_counter(), time.process_time()
        self.frames += 1

    def result(self) -> dict[str, Any]:
        wall, cpu = time.perf_counter(), time.process_time()
        if not self.frames:
            return {"frames": 0, "seconds": 0.0, "cpu_seconds": 0.0, "first_after_connect": 0.0}
        return {
            "frames": self.frames,
            "seconds": wall - self._first_wall,
            "cpu_seconds": cpu - self._first_cpu,
            "first_after_connect": self._first_wall - self._connecting,
        }


def _websocket_client(url: str, frames: int) -> dict[str, Any]:
    """websocket-client with the options the recorder used with it (`recv_data`, no
    UTF-8 validation): the seed's library, part 1's ceiling."""
    tally = Tally()
    ws = websocket.create_connection(url, timeout=RECEIVE_TIMEOUT_SECONDS, skip_utf8_validation=True)
    recv = ws.recv_data
    try:
        while tally.frames < frames:
            opcode, _ = recv()
            if opcode in _DATA:
                tally.add()
            elif opcode == websocket.ABNF.OPCODE_CLOSE:
                break
    except websocket.WebSocketTimeoutException:
        pass
    result = tally.result()
    ws.close()
    return result


def _websockets_sync(url: str, frames: int) -> dict[str, Any]:
    """websockets' threaded client: a background thread reads and parses, `recv` takes."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    tally = Tally()
    with connect(url, compression=None, max_size=None, open_timeout=RECEIVE_TIMEOUT_SECONDS) as ws:
        recv = ws.recv
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            while tally.frames < frames:
                recv(RECEIVE_TIMEOUT_SECONDS, decode=False)
                tally.add()
        return tally.result()


async def _websockets_asyncio(url: str, frames: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    tally = Tally()
    async with connect(url, compression=None, max_size=None) as ws:
        recv = ws.recv
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            while tally.frames < frames:
                await asyncio.wait_for(recv(decode=False), RECEIVE_TIMEOUT_SECONDS)
                tally.add()
        return tally.result()


async def _picows(url: str, frames: int) -> dict[str, Any]:
    """picows (Cython): a listener called per frame; the payload copied to bytes, as
    the recorder needs it for Redis."""
    import picows

    tally = Tally()
    done = asyncio.get_running_loop().create_future()

    class Listener(picows.WSListener):
        def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
            if frame.msg_type in (picows.WSMsgType.TEXT, picows.WSMsgType.BINARY):
                frame.get_payload_as_bytes()
                tally.add()
                if tally.frames >= frames and not done.done():
                    done.set_result(None)
            elif frame.msg_type == picows.WSMsgType.CLOSE and not done.done():
                done.set_result(None)

    transport, _ = await picows.ws_connect(Listener, url)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, RECEIVE_TIMEOUT_SECONDS * 6)
    result = tally.result()
    transport.send_close()
    transport.disconnect()
    return result


LIBRARIES: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "websocket-client": _websocket_client,
    "websockets-sync": _websockets_sync,
    "websockets-asyncio": lambda url, frames: asyncio.run(_websockets_asyncio(url, frames)),
    "picows": lambda url, frames: asyncio.run(_picows(url, frames)),
}
"""Bare receive loops (receive, keep the payload as bytes, discard), one per websocket
library; the first, the seed's library, is part 1's ceiling (the issue's reference). picows
is the recorder's; `websockets` is in the `bench` extra, imported only when run."""


def bare(url: str, frames: int, library: str = "websocket-client") -> dict[str, Any]:
    """The ceiling: receive frames and discard them, as tight as `library` allows."""
    return LIBRARIES[library](url, frames)


def recorder(group_id: str, streams: Sequence[str]) -> dict[str, Any]:
    """The real subscription task's work: GroupRunner, StreamSession, FrameWriter.

    It runs until the group's stop flag is set (the benchmark sets it once every
    frame is in Redis), exactly as `tasks.stream_group` runs it in a Celery worker.
    """
    settings = Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url)
    reason = GroupRunner(Group(group_id, tuple(streams)), settings, client).run()
    return {"ended": reason}


def legacy(url: str, db: str, seconds: float, frames: int, rest_url: str | None) -> dict[str, Any]:
    """The design this project replaces: one process reads the websocket and, for every
    message, parses it, INSERTs one row and COMMITs (sqlite3's default settings: a
    rollback journal and an fsync per commit).

    Runs for `seconds` or `frames` messages. Records each message's latency (commit
    done minus the exchange's event time) and, given the exchange's REST URL, how many
    messages the exchange had produced that were not stored when it stopped.
    """
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE IF NOT EXISTS market_data (symbol TEXT, price REAL, timestamp INTEGER)")
    conn.commit()
    ws = websocket.create_connection(url, timeout=LEGACY_POLL_SECONDS)
    latencies: list[int] = []
    last_ids: dict[tuple[str, str], int] = {}
    start = time.monotonic()
    deadline = start + seconds
    while len(latencies) < frames and time.monotonic() < deadline:
        try:
            message = json.loads(ws.recv())
        except websocket.WebSocketTimeoutException:
            continue
        data = message["data"]
        conn.execute("INSERT INTO market_data VALUES (?, ?, ?)", (data["s"], float(data["p"]), data["T"]))
        conn.commit()
        latencies.append(time.time_ns() // 1_000_000 - data["E"])
        last_ids[(data["s"], data["e"])] = data["t"] if data["e"] == "trade" else data["a"]
    elapsed = time.monotonic() - start
    behind = _messages_behind(rest_url, last_ids) if rest_url else None
    ws.close()
    return {"frames": len(latencies), "seconds": elapsed, "latencies_ms": latencies, "behind": behind}


def _messages_behind(rest_url: str, last_ids: dict[tuple[str, str], int]) -> int:
    """Trades and aggregate trades the exchange has made past the last one stored."""
    behind = 0
    for (symbol, kind), stored in last_ids.items():
        path, field = _REST_LATEST[kind]
        latest = requests.get(f"{rest_url}{path}", params={"symbol": symbol, "limit": "1"}, timeout=10).json()
        behind += max(0, latest[-1][field] - stored)
    return behind


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.receivers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="receiver", required=True)
    bare_args = sub.add_parser("bare")
    bare_args.add_argument("--url", required=True)
    bare_args.add_argument("--frames", type=int, required=True)
    bare_args.add_argument("--library", choices=list(LIBRARIES), default="websocket-client")
    recorder_args = sub.add_parser("recorder")
    recorder_args.add_argument("--group-id", required=True)
    recorder_args.add_argument("--streams", required=True, help="comma-separated stream names")
    legacy_args = sub.add_parser("legacy")
    legacy_args.add_argument("--url", required=True)
    legacy_args.add_argument("--db", required=True)
    legacy_args.add_argument("--seconds", type=float, required=True)
    legacy_args.add_argument("--frames", type=int, default=10**9)
    legacy_args.add_argument("--rest-url")
    args = parser.parse_args()
    if args.receiver == "bare":
        result = bare(args.url, args.frames, args.library)
    elif args.receiver == "recorder":
        result = recorder(args.group_id, args.streams.split(","))
    else:
        result = legacy(args.url, args.db, args.seconds, args.frames, args.rest_url)
    print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
