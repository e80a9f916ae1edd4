"""python-binance, unmodified, on a `binance-recorder replay`: only its two base URLs change.

    python examples/python_binance_replay.py http://127.0.0.1:9443 ws://127.0.0.1:9443 BTCUSDT

Prints each replayed trade as python-binance's ThreadedWebsocketManager delivers it
and, once the replay has sent its whole window, the replay clock and the top of the
book that python-binance's DepthCacheManager built from the replay's REST snapshot and
diffs, as JSON. The snapshot is asked for with 5,000 levels, the most Binance gives:
levels outside a snapshot's range that no diff touches are unknown to the client.
"""

import asyncio
import contextlib
import json
import sys
import time

import requests
from binance import AsyncClient, DepthCacheManager, ThreadedWebsocketManager
from binance.ws.streams import BinanceSocketManager

rest_base, ws_base, symbol = sys.argv[1], sys.argv[2], sys.argv[3]
AsyncClient.API_URL = f"{rest_base}/api"  # REST: /api/v3/... of the replay
BinanceSocketManager.STREAM_URL = f"{ws_base}/"  # websocket: /ws/<stream> of the replay


def on_trade(message: dict) -> None:
    print(f"trade {message['t']} {message['p']} x {message['q']} at {message['T']}", flush=True)


def replay_status() -> dict:
    """The replay's own page: whether its window has been sent, and its last diff (`u`, `E`) per symbol."""
    return requests.get(f"{rest_base}/replay/status", timeout=5).json()


async def book_at_the_end() -> dict:
    """python-binance's DepthCacheManager until it has applied the replay's last diff."""
    client = await AsyncClient.create()
    async with DepthCacheManager(client, symbol, ws_interval=100, limit=5000) as books:
        cache = await books.recv()
        while True:
            status = replay_status()
            if status["ended"] and cache.update_time == status["lastDiffs"][symbol]["E"]:
                break
            with contextlib.suppress(TimeoutError):  # nothing new within a second: ask the replay again
                cache = await asyncio.wait_for(books.recv(), timeout=1)
    await client.close_connection()
    clock = requests.get(f"{rest_base}/api/v3/time", timeout=5).json()["serverTime"]
    return {"clock": clock, "bids": cache.get_bids()[:10], "asks": cache.get_asks()[:10]}


trades = ThreadedWebsocketManager()  # its own thread and event loop, made before asyncio.run's
trades.start()
trades.start_trade_socket(callback=on_trade, symbol=symbol)
while replay_status()["clients"] == 0:  # the trade socket connected first: the replay's clock starts with it
    time.sleep(0.05)
print(json.dumps(asyncio.run(book_at_the_end())), flush=True)
trades.stop()
