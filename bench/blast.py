"""A websocket server that sends N frames as fast as the receiver can take them.

`--mix trades` (the default): trade and aggTrade frames of ten symbols
(`bench.frames.trade_frames`); `--mix market`: the whole market's mix of trade, aggTrade,
bookTicker and depth@100ms frames of 1,500 symbols (`bench.frames.market_frames`).

To measure a receiver's ceiling the sender must be faster than it. aiohttp's
`send_frame` costs about as much per frame as websocket-client's receive, so it would
measure the sender; instead every connection gets the whole stream pre-encoded on the
wire (`worker.replay.wire.websocket_wire`) in one buffer write, and the kernel's socket buffers
pace it to the receiver.

After the last frame the connection stays open until the client closes it (at most
HOLD_SECONDS): a recorder that lost its connection would reconnect and be sent the
stream a second time, which would spoil the count.

Run: `python -m bench.blast --frames 200000`; it prints `blast listening on ws://...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from aiohttp import web

from bench.frames import market_frames, trade_frames
from worker.replay.wire import websocket_wire

HOLD_SECONDS = 60.0
SEND_WAIT_SECONDS = 60.0
_POLL_SECONDS = 0.01
_WIRE = web.AppKey("wire", bytes)
MIXES = {"trades": trade_frames, "market": market_frames}


async def blast(request: web.Request) -> web.WebSocketResponse:
    """`/stream` (any query: the recorder appends its stream names): the whole stream."""
    ws = web.WebSocketResponse(compress=False, autoping=True)
    await ws.prepare(request)
    transport = request.transport
    if transport is not None:
        transport.write(request.app[_WIRE])
        await _until_sent(transport)
        with contextlib.suppress(TimeoutError):
            await ws.receive(timeout=HOLD_SECONDS)  # the client's close (or anything)
    await ws.close()
    return ws


async def _until_sent(transport: asyncio.BaseTransport) -> None:
    """Wait until the kernel took the whole buffer (bounded), so the close comes last."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SEND_WAIT_SECONDS
    while transport.get_write_buffer_size() and loop.time() < deadline:  # type: ignore[attr-defined]
        await asyncio.sleep(_POLL_SECONDS)


async def serve(frame_count: int, port: int, mix: str = "trades") -> None:
    app = web.Application()
    app[_WIRE] = websocket_wire(MIXES[mix](frame_count))
    app.add_routes([web.get("/stream", blast)])
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"blast listening on ws://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blast", description=__doc__)
    parser.add_argument("--frames", type=int, required=True, help="frames sent on every connection")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--mix", choices=sorted(MIXES), default="trades", help="which frames (default %(default)s)")
    args = parser.parse_args()
    asyncio.run(serve(args.frames, args.port, args.mix))


if __name__ == "__main__":
    main()
