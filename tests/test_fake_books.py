"""Order books and the 2026 streams of the fake Binance, over real sockets.

A client that keeps a local book exactly as Binance documents it (buffer diff events,
fetch a snapshot, drop `u <= lastUpdateId`, the first event straddles, then
`U = previous u + 1`) must end up with the fake's own book (GET /fake/book) level by
level. Payloads are checked against Binance's documented examples.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import websocket

from tests.test_fake_exchange import (
    FIXTURES,
    Fake,
    assert_shape,
    connect,
    receive_for,
    request,
    running_fake,
    wait_for_close,
)

LAG_MS = 400


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    """Snapshots lag the streams by LAG_MS: a fresh subscriber must fetch again."""
    with running_fake("--depth-snapshot-lag-ms", str(LAG_MS), "--halted-symbols", "DOTUSDT") as f:
        yield f


class BookGap(Exception):
    """An event's U is above the book's id + 1: updates were lost."""


class LocalBook:
    """A local order book kept by Binance's documented procedure (2025 wording)."""

    def __init__(self, fake: Fake, symbol: str, speed: str = "@100ms") -> None:
        self.fake, self.symbol = fake, symbol
        self.ws = connect(fake.ws_url(f"/stream?streams={symbol.lower()}@depth{speed}"))
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.update_id = -1
        self.snapshots = 0
        self.events: list[dict[str, Any]] = []  # every diff event received, in order

    def next_event(self) -> dict[str, Any]:
        message = json.loads(self.ws.recv())
        assert message["stream"] == f"{self.symbol.lower()}@depth" + message["stream"][len(self.symbol) + 6 :]
        self.events.append(message["data"])
        return message["data"]

    def sync(self) -> None:
        """Steps 1-3: buffer, snapshot (again while older than the first U), drop, straddle."""
        buffered = [self.next_event()]
        first_u = buffered[0]["U"]
        while True:
            status, _, snapshot = self.fake.get(f"/api/v3/depth?symbol={self.symbol}&limit=5000")
            assert status == 200
            self.snapshots += 1
            if snapshot["lastUpdateId"] >= first_u:
                break
            time.sleep(0.1)
        last_update_id = snapshot["lastUpdateId"]
        self.bids = dict(snapshot["bids"])
        self.asks = dict(snapshot["asks"])
        self.update_id = last_update_id
        while buffered[-1]["u"] <= last_update_id:
            buffered.append(self.next_event())
        pending = [e for e in buffered if e["u"] > last_update_id]
        assert pending[0]["U"] <= last_update_id + 1 <= pending[0]["u"]  # it straddles
        for event in pending:
            self.apply(event)

    def apply(self, event: dict[str, Any]) -> None:
        """Step 4: ignore stale events, detect gaps, set absolute quantities."""
        if event["u"] < self.update_id:
            return
        if event["U"] > self.update_id + 1:
            raise BookGap(f"U={event['U']} after book id {self.update_id}")
        for side, levels in ((self.bids, event["b"]), (self.asks, event["a"])):
            for price, qty in levels:
                if Decimal(qty) == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty
        self.update_id = event["u"]

    def follow(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.apply(self.next_event())

    def as_book(self) -> dict[str, Any]:
        """In /fake/book's form: best first on both sides."""
        return {
            "update_id": self.update_id,
            "bids": [list(level) for level in sorted(self.bids.items(), key=_price, reverse=True)],
            "asks": [list(level) for level in sorted(self.asks.items(), key=_price)],
        }

    def close(self) -> None:
        self.ws.close()


def _price(level: tuple[str, str]) -> Decimal:
    return Decimal(level[0])


def fake_book(fake: Fake, symbol: str, update_id: int) -> dict[str, Any]:
    status, _, book = fake.get(f"/fake/book?symbol={symbol}&update_id={update_id}")
    assert status == 200, book
    return book


def assert_chained(events: list[dict[str, Any]]) -> None:
    """Each event covers at least one id, and the next starts right after it."""
    example = FIXTURES["diff_depth"]
    for event in events:
        assert list(event) == list(example)  # one side may be empty ([]), as on Binance
        assert_shape({**event, "b": event["b"] or example["b"], "a": event["a"] or example["a"]}, example)
        assert event["e"] == "depthUpdate" and event["u"] >= event["U"]
    for previous, event in zip(events, events[1:], strict=False):
        assert event["U"] == previous["u"] + 1


# -- diff depth and the local book ------------------------------------------------------


def test_a_book_rebuilt_by_the_documented_procedure_equals_the_fakes(fake: Fake) -> None:
    book = LocalBook(fake, "BTCUSDT")
    book.sync()
    assert book.snapshots >= 2  # the first snapshot was older than the first buffered event
    book.follow(1.5)
    assert book.as_book() == fake_book(fake, "BTCUSDT", book.update_id)
    assert_chained(book.events)
    assert len(book.events) >= 10  # 100 ms events
    assert any(e["u"] > e["U"] for e in book.events)  # one event covers several ids
    removed = [level for e in book.events for level in e["b"] + e["a"] if Decimal(level[1]) == 0]
    assert removed  # levels disappear as well as appear
    book.close()

    again = LocalBook(fake, "BTCUSDT")  # reconnect: a new stream, a new snapshot
    again.sync()
    again.follow(0.5)
    assert again.update_id > book.update_id
    assert again.as_book() == fake_book(fake, "BTCUSDT", again.update_id)
    again.close()


def test_one_second_diff_stream_and_a_snapshot_newer_than_the_buffer() -> None:
    """With no lag the snapshot is usually newer than the first events: they are dropped."""
    with running_fake("--depth-snapshot-lag-ms", "0") as fake:
        book = LocalBook(fake, "ETHUSDT", speed="")
        book.sync()
        assert book.snapshots == 1
        book.follow(2.2)
        assert_chained(book.events)
        assert all(e["u"] - e["U"] + 1 >= 20 for e in book.events[1:])  # ~30 ids a second
        assert book.as_book() == fake_book(fake, "ETHUSDT", book.update_id)

        fake.control("pause_data", seconds=1.2)  # updates of the pause are lost
        with pytest.raises(BookGap):
            book.follow(3)
        book.close()


def test_partial_depth_is_the_top_of_the_fakes_book(fake: Fake) -> None:
    names = ["ethusdt@depth5", "ethusdt@depth10@100ms", "ethusdt@depth20"]
    ws = connect(fake.ws_url("/stream?streams=" + "/".join(names)))
    messages = receive_for(ws, 1.3)
    ws.close()
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for message in messages:
        by_stream.setdefault(message["stream"], []).append(message["data"])
    assert set(by_stream) == set(names)
    assert len(by_stream["ethusdt@depth10@100ms"]) >= 8
    for name, events in by_stream.items():
        levels = int(name.split("@")[1].removeprefix("depth"))
        for event in events[:3]:
            assert_shape(event, FIXTURES["partial_depth"], name)
            book = fake_book(fake, "ETHUSDT", event["lastUpdateId"])
            assert event["bids"] == book["bids"][:levels] and len(event["bids"]) == levels
            assert event["asks"] == book["asks"][:levels] and len(event["asks"]) == levels


def test_depth_snapshot_rest(fake: Fake) -> None:
    status, _, snapshot = fake.get("/api/v3/depth?symbol=SOLUSDT")
    assert status == 200
    assert_shape(snapshot, FIXTURES["depth_rest_snapshot"])
    assert len(snapshot["bids"]) == len(snapshot["asks"]) == 100  # the default limit
    bids = [Decimal(p) for p, _ in snapshot["bids"]]
    asks = [Decimal(p) for p, _ in snapshot["asks"]]
    assert bids == sorted(bids, reverse=True) and asks == sorted(asks) and bids[0] < asks[0]
    book = fake_book(fake, "SOLUSDT", snapshot["lastUpdateId"])
    assert (snapshot["bids"], snapshot["asks"]) == (book["bids"][:100], book["asks"][:100])
    assert fake_book(fake, "SOLUSDT", 0)["update_id"] == 0

    live = fake.get("/fake/book?symbol=SOLUSDT")[2]["update_id"]
    assert live - snapshot["lastUpdateId"] >= 3 * (LAG_MS // 100) - 6  # 3 ids per trade

    everything = fake.get("/api/v3/depth?symbol=SOLUSDT&limit=6000")[2]  # truncated to 5000
    full = fake_book(fake, "SOLUSDT", everything["lastUpdateId"])
    assert (everything["bids"], everything["asks"]) == (full["bids"], full["asks"])
    assert len(full["bids"]) + len(full["asks"]) > 1000

    assert fake.get("/api/v3/depth?symbol=SOLUSDT&limit=0")[2]["code"] == -1130
    assert fake.get("/api/v3/depth?symbol=NOPE")[2] == FIXTURES["error_example"]
    assert fake.get(f"/fake/book?symbol=SOLUSDT&update_id={live + 10_000}")[0] == 400
    assert fake.get("/fake/book?symbol=NOPE")[0] == 400


def test_books_are_the_same_in_a_fake_started_later(fake: Fake) -> None:
    update_id = fake.get("/fake/book?symbol=XRPUSDT")[2]["update_id"]
    with running_fake() as later:
        for symbol in ("XRPUSDT", "BNBUSDT"):
            for uid in (update_id, update_id - 30_000):
                assert fake_book(later, symbol, uid) == fake_book(fake, symbol, uid)
        assert later.get("/fake/book?symbol=XRPUSDT")[2]["update_id"] >= update_id


def test_depth_weight_depends_on_the_limit() -> None:
    while time.time() % 60 > 55:  # all requests must fall in one UTC minute
        time.sleep(0.2)
    with running_fake() as fake:
        used = 0
        for limit, weight in ((None, 5), (100, 5), (101, 25), (500, 25), (1000, 50), (1001, 250), (5000, 250)):
            query = "" if limit is None else f"&limit={limit}"
            status, headers, _ = fake.get(f"/api/v3/depth?symbol=BTCUSDT{query}")
            used += weight
            assert (status, int(headers["X-MBX-USED-WEIGHT-1M"])) == (200, used), limit


# -- streams added in 2026 ----------------------------------------------------------------

NEW_STREAMS = {
    "btcusdt@ticker_1h": "ticker_window",
    "btcusdt@ticker_4h": "ticker_window",
    "btcusdt@ticker_1d": "ticker_window",
    "btcusdt@blockTrade": "blockTrade",
    "btcusdt@referencePrice": "referencePrice",
    "dotusdt@referencePrice": "referencePrice",
    "!miniTicker@arr": "miniTicker_arr",
    "!ticker_1h@arr": "ticker_window",
    "!ticker_4h@arr": "ticker_window",
    "!ticker_1d@arr": "ticker_window",
}


def test_new_streams_subscribe_in_documented_shapes() -> None:
    """Live SUBSCRIBE of every new kind; blocks come every 50 trades (1 s at 50/s)."""
    with running_fake("--trades-per-second", "50", "--halted-symbols", "DOTUSDT") as fake:
        ws = connect(fake.ws_url("/stream"))
        names = list(NEW_STREAMS)
        assert request(ws, {"method": "SUBSCRIBE", "params": names, "id": 1}) == {
            "result": None,
            "id": 1,
        }
        assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 2})["result"] == names
        seen: dict[str, list[Any]] = {}
        for message in receive_for(ws, 2.6):
            if "stream" in message:
                seen.setdefault(message["stream"], []).append(message["data"])
        assert set(seen) == set(names)
        for name, fixture in NEW_STREAMS.items():
            for payload in seen[name]:
                if name.endswith("@arr") and fixture == "ticker_window":
                    assert isinstance(payload, list)
                    for element in payload:
                        assert_shape(element, FIXTURES[fixture], name)
                elif isinstance(payload, dict) and payload.get("r", "") is None:  # price or null
                    assert_shape({**payload, "r": "1.00"}, FIXTURES[fixture], name)
                else:
                    assert_shape(payload, FIXTURES[fixture], name)
        assert_window_tickers(seen)
        assert_block_trades(fake, seen["btcusdt@blockTrade"])
        assert {e["r"] is None for e in seen["dotusdt@referencePrice"]} == {True}  # halted
        reference = seen["btcusdt@referencePrice"][-1]
        assert reference["s"] == "BTCUSDT" and Decimal(reference["r"]) > 0

        assert request(ws, {"method": "UNSUBSCRIBE", "params": names, "id": 3})["result"] is None
        receive_for(ws, 0.2)  # events queued before the unsubscribe
        assert receive_for(ws, 1.2) == []
        ws.close()


def assert_window_tickers(seen: dict[str, list[Any]]) -> None:
    for window, length in (("1h", 3_600_000), ("4h", 14_400_000), ("1d", 86_400_000)):
        ticker = seen[f"btcusdt@ticker_{window}"][-1]
        assert ticker["e"] == f"{window}Ticker" and ticker["s"] == "BTCUSDT"
        assert ticker["C"] - ticker["O"] == length and ticker["n"] == ticker["L"] - ticker["F"] + 1
        everyone = seen[f"!ticker_{window}@arr"][-1]
        assert {t["e"] for t in everyone} == {f"{window}Ticker"}
        assert len(everyone) == 10  # symbols nobody asked for are in the array too
    assert [t["s"] for t in seen["!miniTicker@arr"][-1]][:2] == ["BTCUSDT", "ETHUSDT"]


def assert_block_trades(fake: Fake, blocks: list[dict[str, Any]]) -> None:
    """Block ids grow by one; each block happens at the time of an ordinary trade."""
    assert len(blocks) >= 2
    assert [b["t"] for b in blocks] == list(range(blocks[0]["t"], blocks[0]["t"] + len(blocks)))
    for block in blocks:
        assert block["e"] == "blockTrade" and block["E"] >= block["T"]
        trade = fake.get(f"/api/v3/aggTrades?symbol=BTCUSDT&startTime={block['T']}&endTime={block['T']}")[2]
        assert trade and trade[0]["p"] == block["p"]


def test_depth_streams_count_in_stats_and_the_rate_limit_still_holds(fake: Fake) -> None:
    ws = connect(fake.ws_url("/ws"))
    for i in range(6):
        ws.send(json.dumps({"method": "SUBSCRIBE", "params": [f"s{i}usdt@depth@100ms"], "id": i}))
    code, _ = wait_for_close(ws, 3)
    assert code == 1008
    with pytest.raises(websocket.WebSocketBadStatusException):
        connect(fake.ws_url("/ws/btcusdt@depth15"))
    sent = fake.stats()["sent"]
    assert sent["BTCUSDT"]["depth@100ms"]["count"] >= 10
