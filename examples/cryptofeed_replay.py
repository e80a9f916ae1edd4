"""cryptofeed, unmodified, on a `binance-recorder replay`: only its base URLs change.

    SSL_CERT_FILE=cert.pem REQUESTS_CA_BUNDLE=cert.pem \\
        python examples/cryptofeed_replay.py https://127.0.0.1:9443 wss://127.0.0.1:9443 BTCUSDT

on a replay started with `--certfile cert.pem --keyfile key.pem`: cryptofeed takes only
wss:// websocket URLs, and trusts the certificate through those two variables.

Prints each replayed trade as cryptofeed's TRADES callback delivers it (cryptofeed's
Binance trades are the `aggTrade` stream: the ids are aggregate trade ids) and, once the
replay has sent its whole window, the replay clock, how many book updates cryptofeed
delivered and the top of the book that its L2_BOOK built from the replay's REST snapshot
and diffs, as JSON.
"""

import asyncio
import json
import sys

import requests
from cryptofeed import FeedHandler
from cryptofeed.connection import RestEndpoint, WebsocketEndpoint
from cryptofeed.defines import L2_BOOK, TRADES
from cryptofeed.exchanges import Binance

rest_base, ws_base, symbol = sys.argv[1], sys.argv[2], sys.argv[3]


class ReplayedBinance(Binance):
    """cryptofeed's Binance feed with the replay's base URLs: its endpoints are class attributes."""

    websocket_endpoints = [WebsocketEndpoint(ws_base)]  # websocket: /stream?streams=...
    rest_endpoints = [RestEndpoint(rest_base, routes=Binance.rest_endpoints[0].routes)]  # REST: /api/v3/...


def replay(path: str, **params: str) -> dict:
    return requests.get(f"{rest_base}{path}", params=params, timeout=5).json()


seen: list[int] = []
book: dict = {}


async def on_trade(trade, receipt_timestamp: float) -> None:
    seen.append(int(trade.id))
    print(f"trade {trade.id} {trade.price} x {trade.amount} at {int(trade.timestamp * 1000)}", flush=True)


async def on_book(update, receipt_timestamp: float) -> None:
    levels = update.book
    book.update(update=update.sequence_number, bids=levels.bids.to_list()[:10], asks=levels.asks.to_list()[:10])
    book["updates"] = book.get("updates", 0) + 1


async def stop_at_the_end() -> None:
    """Until the replay has sent its window and the book and the trades have caught up."""
    while True:
        status = await asyncio.to_thread(replay, "/replay/status")
        last_trade = (await asyncio.to_thread(replay, "/api/v3/aggTrades", symbol=symbol, limit="1"))[0]["a"]
        book_done = book.get("update") == status["lastDiffs"].get(symbol, {}).get("u")
        if status["ended"] and book_done and seen and seen[-1] == last_trade:
            break
        await asyncio.sleep(0.1)
    clock = (await asyncio.to_thread(replay, "/api/v3/time"))["serverTime"]
    top = {side: [[float(price), float(qty)] for price, qty in book[side]] for side in ("bids", "asks")}
    print(json.dumps({"clock": clock, "updates": book["updates"], **top}), flush=True)
    asyncio.get_running_loop().stop()  # FeedHandler.run then stops its feeds and returns


config = {"log": {"disabled": True}, "uvloop": False}  # no feedhandler.log; run on the loop made here
asyncio.set_event_loop(asyncio.new_event_loop())
handler = FeedHandler(config=config)
pair = {exchange: std for std, exchange in ReplayedBinance.symbol_mapping().items()}[symbol]  # BTCUSDT -> BTC-USDT
callbacks = {TRADES: on_trade, L2_BOOK: on_book}
handler.add_feed(
    ReplayedBinance(symbols=[pair], channels=[TRADES, L2_BOOK], callbacks=callbacks, max_depth=5000, config=config)
)
asyncio.get_event_loop().create_task(stop_at_the_end())
handler.run()
