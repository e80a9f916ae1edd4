"""The fake's futures markets (USDⓈ-M under /usdm, COIN-M under /coinm), run as a real
process and spoken to over real sockets.

Payloads are compared with the real futures frames in fixtures/futures/ (field names
and JSON types), and parsed with the recorder's own futures row builders
(worker.store.parsing) without a dead letter. Tests that change server-wide state
(settling a contract, spending the REST budget) start their own fake.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.test_fake_exchange import Fake, connect, receive_for, request, running_fake
from worker.store.parsing import parse_frames
from worker.streams import MARKETS, stream_kind

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "futures"
USDM_REST, COINM_REST = "/usdm/fapi/v1", "/coinm/dapi/v1"
# Every kind each market streams, on the path that carries it.
USDM_MARKET_STREAMS = (
    "btcusdt@aggTrade",
    "btcusdt@markPrice@1s",
    "!markPrice@arr@1s",
    "!forceOrder@arr",
    "btcusdt@kline_1m",
    "btcusdt_perpetual@continuousKline_1m",
    "btcusdt@ticker",
    "btcusdt@miniTicker",
    "!ticker@arr",
    "!miniTicker@arr",
)
USDM_PUBLIC_STREAMS = ("btcusdt@depth@100ms", "btcusdt@depth5@100ms", "btcusdt@bookTicker", "btcusdt@trade")
COINM_STREAMS = (
    "btcusd_perp@aggTrade",
    "btcusd_perp@bookTicker",
    "btcusd_perp@depth@100ms",
    "btcusd_perp@depth10@500ms",
    "btcusd_perp@markPrice@1s",
    "btcusd@indexPrice@1s",
    "btcusd@indexPriceKline_1m",
    "btcusd_perp@markPriceKline_1m",
    "btcusd_current_quarter@continuousKline_1m",
    "btcusd_perp@kline_1m",
    "btcusd_perp@ticker",
    "btcusd_perp@miniTicker",
    "!forceOrder@arr",
)


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with running_fake() as f:
        yield f


def collect(fake: Fake, path: str, streams: tuple[str, ...], seconds: float) -> dict[str, list[Any]]:
    """Each stream's payloads received within `seconds` on one combined connection."""
    ws = connect(fake.ws_url(f"{path}?streams=" + "/".join(streams)))
    received: dict[str, list[Any]] = {}
    for message in receive_for(ws, seconds):
        received.setdefault(message["stream"], []).append(message["data"])
    ws.close()
    return received


def fixture_shapes(market: str) -> dict[str, set[Any]]:
    """The shapes of the real payloads of each stream kind (`!`-prefixed for all-market
    streams; for their arrays, the shapes of the elements)."""
    prefix = "um" if market == "usdm" else "cm"
    shapes: dict[str, set[Any]] = {}
    for path in sorted(FIXTURES.glob(f"*_{prefix}*.jsonl")):
        for line in path.read_text().splitlines():
            frame = json.loads(line)
            data = frame.get("data", frame)
            items = data if isinstance(data, list) else [data]
            shapes.setdefault(_example_key(frame.get("stream", "!forceOrder@arr")), set()).update(map(shape, items))
    return shapes


def _example_key(stream: str) -> str:
    return ("!" if stream.startswith("!") else "") + stream_kind(stream)


def shape(value: Any) -> Any:
    """Field names and JSON types, recursively, in any order; lists of levels are just lists."""
    if isinstance(value, dict):
        return frozenset((key, shape(item)) for key, item in value.items())
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return ("list", frozenset(map(shape, value)))
    return "list" if isinstance(value, list) else type(value).__name__


def assert_real_shapes(received: dict[str, list[Any]], market: str) -> None:
    """Every payload (each element of an array) has the fields of a real frame of its kind."""
    shapes = fixture_shapes(market)
    checked = 0
    for stream, payloads in received.items():
        known = shapes.get(_example_key(stream))
        if known is None:
            continue
        for payload in payloads:
            for item in payload if isinstance(payload, list) else [payload]:
                assert shape(item) in known, (stream, item)
        checked += 1
    assert checked >= len(received) - 1, "fixtures lack too many kinds"


def test_futures_base_urls_are_printed_and_serve_their_markets(fake: Fake) -> None:
    assert fake.proc.stdout is not None
    urls = dict(fake.proc.stdout.readline().strip().removeprefix("fake-binance ").split("=", 1) for _ in range(4))
    base = f"127.0.0.1:{fake.port}"
    assert urls == {
        "BINANCE_USDM_WS_URL": f"ws://{base}/usdm",
        "BINANCE_USDM_REST_URL": f"http://{base}/usdm",
        "BINANCE_COINM_WS_URL": f"ws://{base}/coinm",
        "BINANCE_COINM_REST_URL": f"http://{base}/coinm",
    }
    assert fake.get("/usdm/fapi/v1/ping")[:3:2] == (200, {})
    assert fake.get("/coinm/dapi/v1/time")[2]["serverTime"] > 0
    assert status_of(fake, "/usdm/dapi/v1/ping") == 404  # each market serves its own API only
    assert status_of(fake, "/coinm/public/ws") == 404  # COIN-M has no routes


def status_of(fake: Fake, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{fake.port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_usdm_streams_on_their_route_match_real_frames_and_parse(fake: Fake) -> None:
    received = collect(fake, "/usdm/market/stream", USDM_MARKET_STREAMS, 4.0)
    received.update(collect(fake, "/usdm/public/stream", USDM_PUBLIC_STREAMS, 1.5))
    assert set(received) == {*USDM_MARKET_STREAMS, *USDM_PUBLIC_STREAMS}
    assert_real_shapes(received, "usdm")
    arrays = received["!markPrice@arr@1s"][0]
    assert {(e["s"], e["st"]) for e in arrays} >= {("BTCUSDT", 1), ("BTCUSD_PERP", 2)}  # both markets
    assert all(f["st"] in (1, 2) for f in received["!forceOrder@arr"])
    assert_parsed(received, "usdm")


def test_coinm_streams_match_real_frames_and_parse(fake: Fake) -> None:
    received = collect(fake, "/coinm/stream", COINM_STREAMS, 4.0)
    assert set(received) == set(COINM_STREAMS)
    assert_real_shapes(received, "coinm")
    assert received["btcusd@indexPrice@1s"][0]["i"] == "BTCUSD"
    quarter = received["btcusd_current_quarter@continuousKline_1m"][0]
    assert (quarter["ps"], quarter["ct"]) == ("BTCUSD", "CURRENT_QUARTER")
    assert "nq" not in received["btcusd_perp@aggTrade"][0]  # USDⓈ-M's aggTrade has it, COIN-M's not
    assert_parsed(received, "coinm")


def assert_parsed(received: dict[str, list[Any]], market: str) -> None:
    """The recorder's futures parsers store every frame, each kind in its own table."""
    frames = [json.dumps({"stream": s, "data": d}).encode() for s, payloads in received.items() for d in payloads]
    batch = parse_frames([b"@1", *frames], market)
    assert batch.dead_letters == []
    for stream in received:
        table = MARKETS[market].table(stream_kind(stream))
        assert batch.rows[table], f"{stream} filled no row of {table}"


def test_a_stream_on_the_wrong_path_is_acknowledged_and_silent(fake: Fake) -> None:
    # /public carries books, /market the rest; an unrouted path carries what /public does.
    assert post(fake, "/usdm/fake/control", {"action": "reset_stats"}) == {"ok": True}
    cases = {
        "/usdm/public/stream": ("btcusdt@depth@100ms", "btcusdt@aggTrade"),
        "/usdm/market/stream": ("btcusdt@aggTrade", "btcusdt@depth@100ms"),
        "/usdm/stream": ("btcusdt@bookTicker", "btcusdt@markPrice@1s"),
        "/usdm/ws": ("btcusdt@depth@100ms", "btcusdt@kline_1m"),
    }
    for path, (carried, wrong) in cases.items():
        ws = connect(fake.ws_url(path))
        assert request(ws, {"method": "SUBSCRIBE", "params": [carried, wrong], "id": 1}) == {"result": None, "id": 1}
        assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 2})["result"] == [carried, wrong]
        events = [message.get("data", message) for message in receive_for(ws, 2.5)]  # combined or raw
        ws.close()
        named = {e["s"] for e in events}
        kinds = {e["e"] for e in events}
        assert named == {"BTCUSDT"}, (path, events[:3])
        wrong_kind = {"btcusdt@aggTrade": "aggTrade", "btcusdt@depth@100ms": "depthUpdate"}.get(wrong)
        assert wrong_kind not in kinds and "markPriceUpdate" not in kinds and "kline" not in kinds, (path, kinds)
    stats = fake.get("/usdm/fake/stats")[2]["sent"]["BTCUSDT"]
    assert "aggTrade" in stats and "depth@100ms" in stats and "markPrice@1s" not in stats


def test_depth_chains_pu_and_a_snapshot_aligns_to_rebuild_the_fakes_book(fake: Fake) -> None:
    for prefix, route, rest, symbol in (
        ("/usdm", "/public", "/fapi/v1", "BTCUSDT"),
        ("/coinm", "", "/dapi/v1", "BTCUSD_PERP"),
    ):
        book = FuturesBook(fake, prefix + route, prefix + rest, symbol)
        book.sync()
        book.follow(2.0)
        book.ws.close()
        pairs = list(zip(book.events, book.events[1:], strict=False))
        assert all(b["pu"] == a["u"] for a, b in pairs)  # continuity is pu == previous u
        assert any(b["U"] != a["u"] + 1 for a, b in pairs)  # ids are engine-wide: U skips
        assert all(e["E"] >= e["T"] for e in book.events)
        status, _, truth = fake.get(f"{prefix}/fake/book?symbol={symbol}&update_id={book.update_id}")
        assert status == 200 and truth["update_id"] == book.update_id
        for side in ("bids", "asks"):
            assert book.top(side, 200) == [list(level) for level in truth[side][:200]], side


class FuturesBook:
    """A local book kept by Binance's documented futures procedure."""

    def __init__(self, fake: Fake, base: str, rest: str, symbol: str) -> None:
        self.fake, self.rest, self.symbol = fake, rest, symbol
        self.ws = connect(fake.ws_url(f"{base}/stream?streams={symbol.lower()}@depth@100ms"))
        self.events: list[dict[str, Any]] = []
        self.sides: dict[str, dict[str, str]] = {"bids": {}, "asks": {}}
        self.update_id = -1

    def next_event(self) -> dict[str, Any]:
        event = json.loads(self.ws.recv())["data"]
        self.events.append(event)
        return event

    def sync(self) -> None:
        """Buffer, snapshot (again while older than the first event), drop `u < lastUpdateId`;
        the first event kept has U <= lastUpdateId <= u."""
        first = self.next_event()
        while True:
            status, headers, snapshot = self.fake.get(f"{self.rest}/depth?symbol={self.symbol}&limit=1000")
            assert status == 200 and headers["X-MBX-USED-WEIGHT-1M"]
            if snapshot["lastUpdateId"] >= first["U"]:
                break
            time.sleep(0.1)
        assert list(snapshot) == ["lastUpdateId", "E", "T", "bids", "asks"]
        assert max(len(snapshot["bids"]), len(snapshot["asks"])) == 1000  # the near side may hold fewer
        last = snapshot["lastUpdateId"]
        while self.events[-1]["u"] < last:
            self.next_event()
        pending = [e for e in self.events if e["u"] >= last]
        assert pending[0]["U"] <= last <= pending[0]["u"]
        self.sides = {"bids": dict(snapshot["bids"]), "asks": dict(snapshot["asks"])}
        self.update_id = last
        for event in pending:
            self.apply(event)

    def apply(self, event: dict[str, Any]) -> None:
        for side, levels in (("bids", event["b"]), ("asks", event["a"])):
            for price, qty in levels:
                if Decimal(qty) == 0:
                    self.sides[side].pop(price, None)
                else:
                    self.sides[side][price] = qty
        self.update_id = event["u"]

    def follow(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            previous = self.update_id
            event = self.next_event()
            assert event["pu"] == previous, "a gap in the pu chain"
            self.apply(event)

    def top(self, side: str, count: int) -> list[list[str]]:
        levels = sorted(self.sides[side].items(), key=lambda level: Decimal(level[0]), reverse=side == "bids")
        return [list(level) for level in levels[:count]]


def test_exchange_info_shapes_and_funding_intervals(fake: Fake) -> None:
    _, _, usdm = fake.get(f"{USDM_REST}/exchangeInfo")
    _, _, coinm = fake.get(f"{COINM_REST}/exchangeInfo")
    assert usdm["futuresType"] == "U_MARGINED" and usdm["rateLimits"][0]["limit"] == 2400
    by_symbol = {s["symbol"]: s for s in usdm["symbols"]}
    quarter = next(s for s in usdm["symbols"] if s["contractType"] == "CURRENT_QUARTER")
    assert quarter["symbol"].startswith("BTCUSDT_") and quarter["deliveryDate"] > time.time() * 1000
    assert by_symbol["BTCUSDT"]["contractType"] == "PERPETUAL" and by_symbol["BTCUSDT"]["status"] == "TRADING"
    assert {"SOLUSDT", "DOGEUSDT", "ETHUSDT"} <= set(by_symbol)
    coinm_symbols = {s["symbol"]: s for s in coinm["symbols"]}
    assert {"BTCUSD_PERP", "ETHUSD_PERP"} <= set(coinm_symbols) and len(coinm_symbols) == 3
    for info in coinm_symbols.values():
        assert info["contractStatus"] == "TRADING" and "status" not in info and info["marginAsset"] == info["baseAsset"]
    # Each API knows its own market's symbols only.
    assert fake.get(f"{USDM_REST}/depth?symbol=BTCUSD_PERP")[2] == {"code": -1121, "msg": "Invalid symbol."}
    # Funding intervals differ per symbol: the next funding time and the history say so.
    for symbol, hours in (("BTCUSDT", 8), ("SOLUSDT", 4), ("DOGEUSDT", 1)):
        premium = fake.get(f"{USDM_REST}/premiumIndex?symbol={symbol}")[2]
        assert premium["nextFundingTime"] % (hours * 3_600_000) == 0
        history = fake.get(f"{USDM_REST}/fundingRate?symbol={symbol}&limit=3")[2]
        times = [h["fundingTime"] for h in history]
        assert [b - a for a, b in zip(times, times[1:], strict=False)] == [hours * 3_600_000] * 2
        assert times[-1] < premium["nextFundingTime"] <= times[-1] + hours * 3_600_000
    delivery = fake.get(f"{COINM_REST}/premiumIndex?symbol={quarter['symbol'].replace('USDT', 'USD')}")[2][0]
    assert (delivery["lastFundingRate"], delivery["nextFundingTime"]) == ("", 0)  # no funding
    oi = fake.get(f"{COINM_REST}/openInterest?symbol=BTCUSD_PERP")[2]
    assert list(oi) == ["symbol", "pair", "openInterest", "contractType", "time"] and oi["openInterest"].isdigit()
    assert list(fake.get(f"{USDM_REST}/openInterest?symbol=BTCUSDT")[2]) == ["openInterest", "symbol", "time"]


def test_rest_limits_of_futures(fake: Fake) -> None:
    now = int(time.time() * 1000)
    too_long = fake.get(f"{USDM_REST}/aggTrades?symbol=BTCUSDT&startTime={now - 3_700_000}&endTime={now}")
    assert too_long[2]["code"] == -1127
    rows = fake.get(f"{USDM_REST}/aggTrades?symbol=BTCUSDT&limit=3")[2]
    assert list(rows[0]) == ["a", "p", "q", "f", "l", "T", "m"]  # no "M" on futures
    old = fake.get(f"{USDM_REST}/aggTrades?symbol=BTCUSDT&startTime={now - 50 * 3_600_000}&limit=1")[2]
    assert old[0]["T"] >= now - 48 * 3_600_000  # only the last 48 hours are served
    assert len(fake.get(f"{USDM_REST}/klines?symbol=BTCUSDT&interval=1m&limit=1500")[2]) == 1500
    assert fake.get(f"{USDM_REST}/klines?symbol=BTCUSDT&interval=1m&limit=1501")[2]["code"] == -1130
    assert fake.get(f"{COINM_REST}/klines?symbol=BTCUSD_PERP&interval=1s")[2]["code"] == -1120
    deep = fake.get(f"{COINM_REST}/depth?symbol=BTCUSD_PERP&limit=5000")[2]
    assert max(len(deep["bids"]), len(deep["asks"])) == 1000  # at most 1,000 levels a side


def test_settling_contracts_stops_their_streams_and_delists_delivery(fake: Fake) -> None:
    with running_fake() as own:
        quarter = next(s["symbol"] for s in own.get(f"{USDM_REST}/exchangeInfo")[2]["symbols"] if "_" in s["symbol"])
        streams = f"{quarter.lower()}@aggTrade/{quarter.lower()}@markPrice@1s/!markPrice@arr@1s/btcusdt@aggTrade"
        ws = connect(own.ws_url(f"/usdm/market/stream?streams={streams}"))
        before = receive_for(ws, 1.5)
        assert {m["stream"] for m in before} >= {f"{quarter.lower()}@aggTrade", f"{quarter.lower()}@markPrice@1s"}
        answer = post(own, "/usdm/fake/control", {"action": "settle", "symbol": quarter, "delist_after_seconds": 1})
        assert answer == {"ok": True, "symbol": quarter, "status": "DELIVERING", "silenced_streams": 2}
        settled_at = int(time.time() * 1000)
        info = {s["symbol"]: s["status"] for s in own.get(f"{USDM_REST}/exchangeInfo")[2]["symbols"]}
        assert info[quarter] == "DELIVERING"
        after = [m for m in receive_for(ws, 2.0) if m["data"] and _event_time(m["data"]) > settled_at + 100]
        ws.close()
        assert {m["stream"] for m in after} == {"!markPrice@arr@1s", "btcusdt@aggTrade"}  # the rest goes on
        assert all(quarter not in {e["s"] for e in m["data"]} for m in after if m["stream"] == "!markPrice@arr@1s")
        deadline = time.monotonic() + 5
        while quarter in {s["symbol"] for s in own.get(f"{USDM_REST}/exchangeInfo")[2]["symbols"]}:
            assert time.monotonic() < deadline, "the delivered contract stayed listed"
            time.sleep(0.2)
        assert own.get(f"{USDM_REST}/depth?symbol={quarter}")[2]["code"] == -1121
        # A perpetual settles too, but stays listed as SETTLING (as Binance keeps delisted perpetuals).
        assert post(own, "/fake/control", {"action": "settle", "symbol": "ETHUSD_PERP"})["ok"] is False  # spot's
        assert post(own, "/usdm/fake/control", {"action": "settle", "symbol": "ETHUSD_PERP"})["ok"] is False
        perpetual = post(own, "/coinm/fake/control", {"action": "settle", "symbol": "ETHUSD_PERP"})
        assert perpetual["status"] == "SETTLING"
        time.sleep(1.1)
        statuses = {s["symbol"]: s["contractStatus"] for s in own.get(f"{COINM_REST}/exchangeInfo")[2]["symbols"]}
        assert statuses["ETHUSD_PERP"] == "SETTLING"


def _event_time(data: Any) -> int:
    return int(data[0]["E"] if isinstance(data, list) else data["E"])


def post(fake: Fake, path: str, body: dict[str, Any]) -> Any:
    """POST a JSON body; the answer's JSON whatever the status (controls answer 400 with ok false)."""
    request_ = urllib.request.Request(f"http://127.0.0.1:{fake.port}{path}", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request_, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def test_fapi_and_dapi_share_one_weight_budget(fake: Fake) -> None:
    with running_fake("--futures-weight-limit", "50") as own:
        while time.time() % 60 > 50:  # all requests within one UTC minute
            time.sleep(0.5)
        first = own.get(f"{USDM_REST}/depth?symbol=BTCUSDT&limit=1000")
        second = own.get(f"{COINM_REST}/depth?symbol=BTCUSD_PERP&limit=1000")
        assert (first[0], first[1]["X-MBX-USED-WEIGHT-1M"]) == (200, "20")
        assert (second[0], second[1]["X-MBX-USED-WEIGHT-1M"]) == (200, "40")  # one budget for both
        third = own.get(f"{COINM_REST}/klines?symbol=BTCUSD_PERP&interval=1m&limit=1000")  # weight 5: 45
        fourth = own.get(f"{USDM_REST}/depth?symbol=BTCUSDT&limit=100")  # weight 5: 50
        over = own.get(f"{USDM_REST}/ping")
        assert [third[0], fourth[0], over[0]] == [200, 200, 429]
        assert over[2]["code"] == -1003 and "2400" not in over[2]["msg"] and "50" in over[2]["msg"]
        assert own.get(f"{COINM_REST}/ping")[0] == 418  # ignoring the 429 earns a ban, on both
        assert own.get("/api/v3/ping")[0] == 200  # spot's budget is its own
        assert own.get("/usdm/fake/stats")[2]["rest"]["by_status"] == {"200": 2, "429": 1}
