"""ccxt pro, unmodified, on a `binance-recorder replay`: only its base URLs change.

    python examples/ccxt_replay.py http://127.0.0.1:9443 ws://127.0.0.1:9443 BTCUSDT

Prints each replayed trade as ccxt's `watch_trades` delivers it and, once the replay has
sent its whole window, the replay clock, how many book updates ccxt delivered and the top
of the book that ccxt's `watch_order_book` built from the replay's REST snapshot and
diffs, as JSON.
"""

import asyncio
import json
import sys

import ccxt.pro
import requests

rest_base, ws_base, symbol = sys.argv[1], sys.argv[2], sys.argv[3]
exchange = ccxt.pro.binance()
exchange.urls["api"]["public"] = f"{rest_base}/api/v3"  # REST: /api/v3/exchangeInfo, /api/v3/depth
exchange.urls["api"]["fapiPublic"] = f"{rest_base}/fapi/v1"  # load_markets asks the futures listings too
exchange.urls["api"]["dapiPublic"] = f"{rest_base}/dapi/v1"
exchange.urls["api"]["ws"]["spot"] = f"{ws_base}/ws"  # websocket: /ws/<n>, then SUBSCRIBE


def replay(path: str, **params: str) -> dict:
    return requests.get(f"{rest_base}{path}", params=params, timeout=5).json()


async def print_trades(market: str, seen: list[int], first: asyncio.Event) -> None:
    while True:
        for trade in await exchange.watch_trades(market):
            if not seen or int(trade["id"]) > seen[-1]:
                seen.append(int(trade["id"]))
                print(f"trade {trade['id']} {trade['price']} x {trade['amount']} at {trade['timestamp']}", flush=True)
        first.set()


async def keep_book(market: str, books: list) -> None:
    while True:
        books.append(await exchange.watch_order_book(market, limit=5000))


async def main() -> dict:
    await exchange.load_markets()
    market = exchange.market(symbol)["symbol"]  # BTCUSDT -> BTC/USDT
    seen: list[int] = []
    books: list = []
    first = asyncio.Event()
    trades = asyncio.create_task(print_trades(market, seen, first))
    await first.wait()  # the trade subscription starts the replay's clock, then the book's
    book = asyncio.create_task(keep_book(market, books))
    while True:  # until the replay has sent its window and the book and the trades have caught up
        status = await asyncio.to_thread(replay, "/replay/status")
        last_trade = (await asyncio.to_thread(replay, "/api/v3/trades", symbol=symbol, limit="1"))[0]["id"]
        book_done = books and books[-1]["nonce"] == status["lastDiffs"][symbol]["u"]
        if status["ended"] and book_done and seen[-1] == last_trade:
            break
        await asyncio.sleep(0.1)
    trades.cancel()
    book.cancel()
    clock = (await asyncio.to_thread(replay, "/api/v3/time"))["serverTime"]
    await exchange.close()
    return {"clock": clock, "updates": len(books), "bids": books[-1]["bids"][:10], "asks": books[-1]["asks"][:10]}


print(json.dumps(asyncio.run(main())), flush=True)
