"""The fake Binance, run as a real process and spoken to over real sockets.

Payload shapes are checked against Binance's documented examples in
fixtures/binance-doc-examples.json. Timings are shortened by CLI flags so the whole
file runs in well under a minute. Tests that change server-wide state (bans, rate,
shutdown) start their own fake.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import websocket
from websocket import ABNF

from fake_binance.config import DEFAULT_SYMBOLS, MARKET_EPOCH_MS

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = json.loads((ROOT / "tests" / "fixtures" / "binance-doc-examples.json").read_text())
LISTENING = re.compile(r"^fake-binance listening on http://127\.0\.0\.1:(\d+)$")
# Control messages on the main fake are spaced so that, with one auto-pong per
# second, no one-second window holds more than 5 incoming messages.
PACE_SECONDS = 0.35


def trade_id(symbol: str, trade_time: int) -> int:
    """The id of the trade at `trade_time` at the default 10 trades/s: one every 100 ms
    from the epoch, numbered from (position of the symbol + 1) * 1,000,000."""
    return (DEFAULT_SYMBOLS.index(symbol) + 1) * 1_000_000 + (trade_time - MARKET_EPOCH_MS) // 100


class Fake:
    """A running `python -m fake_binance` process and helpers to talk to it."""

    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fake_binance", "--port", "0", *flags],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        match = LISTENING.match(line)
        assert match, f"unexpected first line {line!r}"
        self.port = int(match.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the fake and wait for its exit: its own shutdown allows open requests 5 s,
        and four test files at a time on two cores once made a stop take over 10 s."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.stdout.close()  # type: ignore[union-attr]

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, dict[str, str], Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def control(self, action: str, **fields: Any) -> dict[str, Any]:
        body = json.dumps({"action": action, **fields}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/fake/control", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self.get("/fake/stats")[2]


@contextmanager
def running_fake(*flags: str) -> Iterator[Fake]:
    fake = Fake(*flags)
    try:
        yield fake
    finally:
        assert fake.stop() == 0


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    """The shared fake: Binance's limits, but pings every second."""
    with running_fake("--ping-interval", "1", "--pong-timeout", "2", "--halted-symbols", "DOTUSDT") as f:
        yield f


def connect(url: str) -> websocket.WebSocket:
    return websocket.create_connection(url, timeout=5)


def receive_for(ws: websocket.WebSocket, seconds: float) -> list[Any]:
    """All JSON messages that arrive within `seconds`."""
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        ws.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            out.append(json.loads(ws.recv()))
        except websocket.WebSocketTimeoutException:
            break
    ws.settimeout(5)
    return out


def request(ws: websocket.WebSocket, message: str | dict[str, Any]) -> dict[str, Any]:
    """Send one control message and return its response, skipping data events."""
    time.sleep(PACE_SECONDS)
    ws.send(message if isinstance(message, str) else json.dumps(message))
    while True:
        reply = json.loads(ws.recv())
        if isinstance(reply, dict) and ("result" in reply or "code" in reply):
            return reply


def wait_for_close(ws: websocket.WebSocket, within: float) -> tuple[int, float]:
    """Read until the server's close frame (answered by websocket-client), then drop
    the socket; return (close code, seconds waited)."""
    start = time.monotonic()
    ws.settimeout(within)
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == ABNF.OPCODE_CLOSE:
            ws.shutdown()
            return int.from_bytes(frame.data[:2], "big"), time.monotonic() - start


def assert_shape(actual: Any, example: Any, where: str = "") -> None:
    """Same keys and JSON types as the documented example; decimals are strings."""
    if isinstance(example, dict):
        assert isinstance(actual, dict) and list(actual) == list(example), (where, actual)
        for key in example:
            assert_shape(actual[key], example[key], f"{where}.{key}")
    elif isinstance(example, list):
        assert isinstance(actual, list) and bool(actual) == bool(example), (where, actual)
        if all(not isinstance(e, (dict, list)) for e in example) and len(example) > 1:
            assert len(actual) == len(example), (where, actual)
            for i, (a, e) in enumerate(zip(actual, example, strict=True)):
                assert_shape(a, e, f"{where}[{i}]")
        else:
            for item in actual:
                assert_shape(item, example[0], f"{where}[]")
    else:
        assert type(actual) is type(example), (where, actual, example)
        if isinstance(example, str) and re.fullmatch(r"-?\d+(\.\d+)?", example):
            Decimal(actual)  # a decimal string, as Binance sends prices and quantities


# -- websocket streams ----------------------------------------------------------------


def test_combined_stream_wraps_every_kind_in_documented_shapes(fake: Fake) -> None:
    expected = {
        "btcusdt@trade": "trade",
        "btcusdt@aggTrade": "aggTrade",
        "btcusdt@bookTicker": "bookTicker",
        "btcusdt@kline_1m": "kline",
        "btcusdt@ticker": "ticker",
        "btcusdt@miniTicker": "miniTicker",
        "btcusdt@avgPrice": "avgPrice",
        "!miniTicker@arr": "miniTicker_arr",
    }
    ws = connect(fake.ws_url("/stream?streams=" + "/".join(expected)))
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 4
    while len(seen) < len(expected) and time.monotonic() < deadline:
        message = json.loads(ws.recv())
        assert list(message) == ["stream", "data"]
        seen.setdefault(message["stream"], message["data"])
    ws.close()
    assert set(seen) == set(expected)
    for stream, fixture_key in expected.items():
        assert_shape(seen[stream], FIXTURES[fixture_key], stream)
    assert seen["btcusdt@kline_1m"]["k"]["i"] == "1m"
    assert seen["btcusdt@avgPrice"]["i"] == "5m"
    assert seen["btcusdt@ticker"]["e"] == "24hrTicker"
    assert [t["s"] for t in seen["!miniTicker@arr"]][:2] == ["BTCUSDT", "ETHUSDT"]
    trade = seen["btcusdt@trade"]
    assert trade["s"] == "BTCUSDT" and trade["E"] >= trade["T"]
    assert trade["t"] == trade_id("BTCUSDT", trade["T"])  # BTCUSDT's ids, on the epoch's clock


def test_raw_streams_deliver_bare_payloads_with_consecutive_trade_ids(fake: Fake) -> None:
    ws = connect(fake.ws_url("/ws/ethusdt@trade/solusdt@trade"))
    events = receive_for(ws, 1.5)
    ws.close()
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        assert "stream" not in event
        assert_shape(event, FIXTURES["trade"])
        by_symbol.setdefault(event["s"], []).append(event)
    assert set(by_symbol) == {"ETHUSDT", "SOLUSDT"}
    for trades in by_symbol.values():
        ids = [t["t"] for t in trades]
        assert len(ids) >= 10  # 10 trades/s per symbol
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert [t["T"] for t in trades] == sorted(t["T"] for t in trades)


def test_each_kline_window_ends_with_one_final_event_matching_rest(fake: Fake) -> None:
    ws = connect(fake.ws_url("/ws/xrpusdt@kline_1s"))
    klines = [e["k"] for e in receive_for(ws, 2.3)]
    ws.close()
    final = [k for k in klines if k["x"]]
    assert len(final) >= 2 and len({k["t"] for k in final}) == len(final)
    for k in final:
        assert (k["T"] - k["t"], k["n"], k["L"] - k["f"] + 1) == (999, 10, 10)
    assert any(not k["x"] and k["t"] == final[0]["t"] + 1000 for k in klines)
    k = final[0]
    row = fake.get(f"/api/v3/klines?symbol=XRPUSDT&interval=1s&startTime={k['t']}&limit=1")[2][0]
    assert row[:9] == [k["t"], k["o"], k["h"], k["l"], k["c"], k["v"], k["T"], k["q"], k["n"]]


def test_unknown_symbol_is_silent_and_bad_streams_are_refused(fake: Fake) -> None:
    ws = connect(fake.ws_url("/ws/nosuchusdt@trade"))
    assert receive_for(ws, 0.6) == []
    ws.close()
    for path in (
        "/ws/btcusdt@nosuchkind",
        "/stream?streams=" + "/".join(f"s{i}usdt@trade" for i in range(1025)),
    ):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            connect(fake.ws_url(path))
        assert refused.value.status_code == 400
        body = json.loads(refused.value.resp_body)
        assert body["code"] == 2 and body["msg"].startswith("Invalid request: ")
    ws = connect(fake.ws_url("/stream?streams=" + "/".join(f"s{i}usdt@trade" for i in range(1024))))
    assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1})["result"][1023] == "s1023usdt@trade"
    ws.close()


def test_live_subscribe_list_properties_unsubscribe(fake: Fake) -> None:
    ws = connect(fake.ws_url("/ws"))
    assert receive_for(ws, 0.3) == []
    assert request(ws, FIXTURES["subscribe_request"] | {"params": ["xrpusdt@trade"]}) == {
        "result": None,
        "id": 1,
    }
    assert request(ws, FIXTURES["list_subscriptions_request"]) == {
        "result": ["xrpusdt@trade"],
        "id": 3,
    }
    assert request(ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": "get-1"}) == {
        "result": False,
        "id": "get-1",
    }
    raw = receive_for(ws, 0.3)
    assert raw and all(e["e"] == "trade" and e["s"] == "XRPUSDT" for e in raw)
    assert request(ws, FIXTURES["set_property_request"]) == FIXTURES["set_property_response"]
    wrapped = receive_for(ws, 0.3)
    assert wrapped and all(m["stream"] == "xrpusdt@trade" for m in wrapped)
    assert request(ws, {"method": "UNSUBSCRIBE", "params": ["xrpusdt@trade"], "id": None}) == {
        "result": None,
        "id": None,
    }
    receive_for(ws, 0.1)  # events queued before the unsubscribe
    assert receive_for(ws, 0.5) == []
    ws.close()


def test_control_errors_use_binance_codes(fake: Fake) -> None:
    ws = connect(fake.ws_url("/ws"))
    invalid_json = request(ws, "{not json")
    assert invalid_json["code"] == 3 and invalid_json["msg"].startswith("Invalid JSON: ")
    unknown = request(ws, {"method": "SUBSCRIBEE", "params": [], "id": 7})
    assert unknown["code"] == 2 and "unknown variant `SUBSCRIBEE`" in unknown["msg"] and unknown["id"] == 7
    bad_id = request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": "x" * 37})
    assert bad_id["code"] == 2 and bad_id["msg"].startswith("Invalid request: ")
    bad_stream = request(ws, {"method": "SUBSCRIBE", "params": ["btcusdt@depth99"], "id": 8})
    assert bad_stream["code"] == 2 and "btcusdt@depth99" in bad_stream["msg"]
    assert request(ws, {"method": "GET_PROPERTY", "params": ["colour"], "id": 9})["code"] == 0
    assert request(ws, {"method": "SET_PROPERTY", "params": ["combined", 1], "id": 10})["code"] == 1
    assert request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 11}) == {"result": [], "id": 11}
    ws.close()


def test_too_many_incoming_messages_close_with_1008(fake: Fake) -> None:
    before = fake.stats()["connections"]["closed_for_rate_limit"]
    ws = connect(fake.ws_url("/ws"))
    for i in range(6):
        ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}))
    code, _ = wait_for_close(ws, 3)
    assert code == 1008
    assert fake.stats()["connections"]["closed_for_rate_limit"] == before + 1


def test_pings_need_pongs_that_echo_the_payload(fake: Fake) -> None:
    """A client that pongs survives pong_timeout (2 s); one that never pongs is closed."""
    survivor: dict[str, Any] = {}

    def ponging_client() -> None:
        ws = connect(fake.ws_url("/ws/adausdt@bookTicker"))
        pings, deadline = [], time.monotonic() + 4
        while time.monotonic() < deadline:
            opcode, frame = ws.recv_data_frame(control_frame=True)  # answers pings itself
            if opcode == ABNF.OPCODE_PING:
                pings.append(frame.data)
            assert opcode != ABNF.OPCODE_CLOSE
        survivor["pings"] = pings
        ws.close()

    thread = threading.Thread(target=ponging_client)
    thread.start()
    before = fake.stats()["connections"]["closed_for_missing_pong"]
    silent = connect(fake.ws_url("/ws/adausdt@trade"))
    start, pings = time.monotonic(), []
    silent.settimeout(6)
    while True:
        frame = silent.recv_frame()  # the low-level read never answers pings
        if frame.opcode == ABNF.OPCODE_PING:
            pings.append(frame.data)
        if frame.opcode == ABNF.OPCODE_CLOSE:
            break
    waited = time.monotonic() - start
    silent.shutdown()
    thread.join()
    assert 2.5 < waited < 4.5  # first ping after 1 s, closed 2 s later
    assert pings and all(p.decode().isdigit() and abs(int(p) / 1000 - time.time()) < 10 for p in pings)
    assert len(survivor["pings"]) >= 3
    assert fake.stats()["connections"]["closed_for_missing_pong"] == before + 1


# -- REST ---------------------------------------------------------------------------


def test_exchange_info_known_unknown_list_and_halted(fake: Fake) -> None:
    status, _, body = fake.get("/api/v3/exchangeInfo?symbol=BTCUSDT")
    assert status == 200 and body["timezone"] == "UTC" and body["exchangeFilters"] == []
    (btc,) = body["symbols"]
    assert_shape(btc, FIXTURES["exchangeInfo_symbol_example"])
    assert (btc["symbol"], btc["status"], btc["baseAsset"], btc["quoteAsset"]) == (
        "BTCUSDT",
        "TRADING",
        "BTC",
        "USDT",
    )
    assert {
        "rateLimitType": "REQUEST_WEIGHT",
        "interval": "MINUTE",
        "intervalNum": 1,
        "limit": 6000,
    } in body["rateLimits"]
    status, _, body = fake.get("/api/v3/exchangeInfo?symbol=NOSUCH")
    assert (status, body) == (400, FIXTURES["error_example"])
    listed = urllib.parse.quote('["ETHUSDT","DOTUSDT"]')
    assert [(s["symbol"], s["status"]) for s in fake.get(f"/api/v3/exchangeInfo?symbols={listed}")[2]["symbols"]] == [
        ("ETHUSDT", "TRADING"),
        ("DOTUSDT", "HALT"),
    ]
    assert fake.get("/api/v3/exchangeInfo?symbols=" + urllib.parse.quote('["ETHUSDT","NOPE"]'))[2]["code"] == -1121
    assert len(fake.get("/api/v3/exchangeInfo")[2]["symbols"]) == 10


def test_rest_history_pages_match_what_the_websocket_sent(fake: Fake) -> None:
    ws = connect(fake.ws_url("/stream?streams=bnbusdt@trade/bnbusdt@aggTrade"))
    events = [m["data"] for m in receive_for(ws, 1.2)]
    ws.close()
    trades = {e["t"]: e for e in events if e["e"] == "trade"}
    aggs = {e["a"]: e for e in events if e["e"] == "aggTrade"}
    assert len(trades) >= 10 and len(aggs) >= 10

    def pages(path: str, first: int, last: int, key: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        while not rows or rows[-1][key] < last:
            status, _, page = fake.get(f"{path}&fromId={rows[-1][key] + 1 if rows else first}&limit=4")
            assert status == 200 and 0 < len(page) <= 4
            rows += page
        return rows

    rest_trades = pages("/api/v3/historicalTrades?symbol=BNBUSDT", min(trades), max(trades), "id")
    assert [r["id"] for r in rest_trades] == list(range(min(trades), min(trades) + len(rest_trades)))
    for row in rest_trades:
        assert_shape(row, FIXTURES["historicalTrades_rest_row"])
        if row["id"] in trades:
            ws_trade = trades[row["id"]]
            assert (row["price"], row["qty"], row["time"], row["isBuyerMaker"]) == (
                ws_trade["p"],
                ws_trade["q"],
                ws_trade["T"],
                ws_trade["m"],
            )
    assert set(trades) <= {r["id"] for r in rest_trades}

    rest_aggs = pages("/api/v3/aggTrades?symbol=BNBUSDT", min(aggs), max(aggs), "a")
    assert [r["a"] for r in rest_aggs] == list(range(min(aggs), min(aggs) + len(rest_aggs)))
    for row in rest_aggs:
        assert_shape(row, FIXTURES["aggTrades_rest_row"])
        if row["a"] in aggs:
            assert {k: aggs[row["a"]][k] for k in row} == row

    recent = fake.get("/api/v3/trades?symbol=BNBUSDT&limit=3")[2]
    assert len(recent) == 3 and recent[2]["id"] - recent[0]["id"] == 2 and recent[2]["id"] >= max(trades)


def test_klines_agree_with_the_trades_inside_them(fake: Fake) -> None:
    status, _, rows = fake.get("/api/v3/klines?symbol=LTCUSDT&interval=1m&limit=3")
    assert status == 200 and len(rows) == 3
    for row in rows:
        assert_shape(row, FIXTURES["klines_rest_row"])
    assert [r[0] for r in rows] == [rows[0][0], rows[0][0] + 60_000, rows[0][0] + 120_000]
    assert rows[2][6] == rows[2][0] + 59_999 and rows[2][0] <= time.time() * 1000 < rows[2][6] + 1000
    open_ms, _, high, low, _, _, close_ms, _, count, *_ = closed = rows[1]
    status, _, trades = fake.get(f"/api/v3/aggTrades?symbol=LTCUSDT&startTime={open_ms}&endTime={close_ms}&limit=1000")
    assert status == 200 and len(trades) == count == 600  # 10 trades/s
    prices = [Decimal(t["p"]) for t in trades]
    assert (closed[1], closed[4]) == (trades[0]["p"], trades[-1]["p"])
    assert max(prices[0], prices[-1]) <= Decimal(high) <= max(prices)
    assert min(prices) <= Decimal(low) <= min(prices[0], prices[-1])
    assert open_ms <= trades[0]["T"] and trades[-1]["T"] <= close_ms

    genesis = fake.get("/api/v3/klines?symbol=LTCUSDT&interval=1m&startTime=0&limit=2")[2]
    assert genesis[0][0] % 60_000 == 0 and genesis[1][0] == genesis[0][0] + 60_000
    assert time.time() * 1000 - genesis[0][0] >= 3_600_000  # an hour of history at start-up
    assert fake.get("/api/v3/klines?symbol=LTCUSDT&interval=7m")[2] == {
        "code": -1120,
        "msg": "Invalid interval.",
    }
    assert fake.get("/api/v3/klines?symbol=LTCUSDT&interval=1m&limit=1001")[2]["code"] == -1130
    assert fake.get("/api/v3/klines?interval=1m")[2] == {
        "code": -1102,
        "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
    }


def test_history_is_identical_in_another_process(fake: Fake) -> None:
    genesis = fake.get("/api/v3/klines?symbol=ETHUSDT&interval=1m&startTime=0&limit=1")[2][0][0]
    assert genesis == MARKET_EPOCH_MS  # history reaches back to the fixed epoch
    recent = fake.get("/api/v3/historicalTrades?symbol=ETHUSDT&limit=1")[2][0]["id"]
    with running_fake() as twin:  # no shared flag: the epoch alone makes them agree
        for path, rows in (
            ("/api/v3/aggTrades?symbol=ETHUSDT&fromId=1000100&limit=50", 50),
            ("/api/v3/historicalTrades?symbol=ETHUSDT&fromId=2000100&limit=50", 50),
            (f"/api/v3/historicalTrades?symbol=ETHUSDT&fromId={recent - 100}&limit=50", 50),
            ("/api/v3/klines?symbol=ETHUSDT&interval=1m&startTime=0&limit=5", 5),
        ):
            ours, theirs = fake.get(path)[2], twin.get(path)[2]
            assert len(ours) == rows and ours == theirs, path


def test_a_restarted_fake_continues_the_same_market() -> None:
    """Trade ids never repeat across restarts, and two runs agree on every trade."""

    def live_trades() -> list[dict[str, Any]]:
        with running_fake() as run:
            ws = connect(run.ws_url("/ws/solusdt@trade"))
            trades = receive_for(ws, 0.8)
            ws.close()
        return trades

    before, after = live_trades(), live_trades()
    assert len(before) >= 5 and len(after) >= 5
    assert min(t["t"] for t in after) > max(t["t"] for t in before)
    for t in before + after:
        assert t["t"] == trade_id("SOLUSDT", t["T"])
    with running_fake() as third:  # REST of a later run still serves the first run's trades
        first = before[0]["t"]
        rows = third.get(f"/api/v3/historicalTrades?symbol=SOLUSDT&fromId={first}&limit=1000")[2]
        served = [(r["id"], r["price"], r["qty"], r["time"], r["isBuyerMaker"]) for r in rows]
        assert served[: len(before)] == [(t["t"], t["p"], t["q"], t["T"], t["m"]) for t in before]
        assert rows[-1]["id"] >= max(t["t"] for t in after)


def test_every_response_reports_the_used_weight(fake: Fake) -> None:
    _, first, _ = fake.get("/api/v3/ping")
    _, second, _ = fake.get("/api/v3/historicalTrades?symbol=BTCUSDT&limit=1")
    used = int(first["X-MBX-USED-WEIGHT-1M"]), int(second["X-MBX-USED-WEIGHT-1M"])
    assert used[0] >= 1 and (used[1] - used[0] == 25 or used[1] == 25)  # 25 alone if a minute began


def test_weight_limit_gives_429_then_418_ban() -> None:
    while time.time() % 60 > 57:  # all three requests must fall in one UTC minute
        time.sleep(0.2)
    with running_fake("--weight-limit", "30", "--ban-seconds", "7") as fake:
        status, headers, _ = fake.get("/api/v3/exchangeInfo")
        assert (status, headers["X-MBX-USED-WEIGHT-1M"]) == (200, "20")
        status, headers, body = fake.get("/api/v3/exchangeInfo")
        assert (status, body["code"], headers["X-MBX-USED-WEIGHT-1M"]) == (429, -1003, "40")
        assert abs(int(headers["Retry-After"]) - (60 - time.time() % 60)) <= 1.5  # to the next minute
        status, headers, body = fake.get("/api/v3/ping")
        assert (status, body["code"], headers["Retry-After"]) == (418, -1003, "7")
        assert fake.get("/api/v3/time")[0] == 418
        assert fake.stats()["rest"]["by_status"] == {"200": 1, "429": 1, "418": 2}


def test_injected_faults_reward_waiting_and_punish_impatience() -> None:
    with running_fake("--ban-seconds", "9") as fake:
        fake.control("rest_fault", status=429, count=1, retry_after=1)
        status, headers, _ = fake.get("/api/v3/ping")
        assert (status, headers["Retry-After"]) == (429, "1")
        time.sleep(1.05)
        assert fake.get("/api/v3/ping")[0] == 200  # waited as told

        fake.control("rest_fault", status=418, count=1, retry_after=1)
        status, headers, _ = fake.get("/api/v3/ping")
        assert (status, headers["Retry-After"]) == (418, "1")
        assert fake.get("/api/v3/ping")[0] == 418  # still banned
        time.sleep(1.05)
        assert fake.get("/api/v3/ping")[0] == 200

        fake.control("rest_fault", status=429, count=2, retry_after=5)
        assert fake.get("/api/v3/ping")[0] == 429
        status, headers, _ = fake.get("/api/v3/ping")  # retried at once
        assert (status, headers["Retry-After"]) == (418, "9")


# -- server-side events and test controls ---------------------------------------------


def test_connection_lifetime_ends_with_a_normal_close() -> None:
    with running_fake("--max-connection-seconds", "1.5") as fake:
        ws = connect(fake.ws_url("/ws/btcusdt@trade"))
        code, waited = wait_for_close(ws, 4)
        assert code == 1000 and 1.2 < waited < 2.5


def test_server_shutdown_event_then_close() -> None:
    with running_fake() as fake:
        combined = connect(fake.ws_url("/stream?streams=btcusdt@trade"))
        raw = connect(fake.ws_url("/ws/nosuchusdt@trade"))
        time.sleep(0.2)
        assert fake.control("server_shutdown", grace_seconds=1.0) == {"ok": True, "connections": 2}
        messages = receive_for(combined, 0.3)
        shutdown = [m for m in messages if m["stream"] == "!serverShutdown"]
        assert len(shutdown) == 1 and list(shutdown[0]["data"]) == ["e", "E"]
        assert shutdown[0]["data"]["e"] == "serverShutdown"
        (event,) = receive_for(raw, 0.3)
        assert_shape(event, FIXTURES["serverShutdown"])
        assert wait_for_close(combined, 2)[0] == 1000 and wait_for_close(raw, 2)[0] == 1000


def test_set_rate_pause_close_and_drop_controls() -> None:
    with running_fake("--ping-interval", "0.3", "--pong-timeout", "5") as fake:
        ws = connect(fake.ws_url("/ws/dogeusdt@trade"))
        slow = receive_for(ws, 1.0)
        assert fake.control("set_rate", trades_per_second=100)["ok"] is True
        fast = receive_for(ws, 1.0)
        ids = [t["t"] for t in slow + fast]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap or repeat across the change
        assert len(fast) > 5 * len(slow)

        fake.control("pause_data", seconds=1.0)
        receive_for(ws, 0.05)
        pings, deadline = 0, time.monotonic() + 0.85
        while (left := deadline - time.monotonic()) > 0:
            ws.settimeout(left)
            try:
                opcode, frame = ws.recv_data_frame(control_frame=True)
            except websocket.WebSocketTimeoutException:
                break
            assert opcode == ABNF.OPCODE_PING, ("data arrived during pause_data", frame.data)
            pings += 1
        assert pings >= 2
        resumed = receive_for(ws, 0.5)
        assert resumed and resumed[0]["t"] > ids[-1] + 50  # the pause left a gap to backfill

        assert fake.control("close_all") == {"ok": True, "connections": 1}
        assert wait_for_close(ws, 2)[0] == 1000

        dropped = connect(fake.ws_url("/ws/dogeusdt@trade"))
        assert fake.control("drop_all")["connections"] == 1
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionResetError)):
            while True:
                opcode, _ = dropped.recv_data_frame(control_frame=True)
                assert opcode != ABNF.OPCODE_CLOSE, "drop_all must not send a close frame"
        dropped.shutdown()

        with pytest.raises(urllib.error.HTTPError) as bad:
            fake.control("explode")
        assert bad.value.code == 400 and "unknown action" in json.loads(bad.value.read())["error"]


def test_chaos_drops_connections_without_close_frames() -> None:
    with running_fake("--chaos-drop-every", "0.3", "--chaos-seed", "3") as fake:
        ws = connect(fake.ws_url("/ws/trxusdt@trade"))
        with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionResetError)):
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                opcode, _ = ws.recv_data_frame(control_frame=True)
                assert opcode != ABNF.OPCODE_CLOSE
        ws.shutdown()
        assert fake.stats()["connections"]["dropped_by_chaos"] >= 1


def test_stats_count_connections_and_sent_events(fake: Fake) -> None:
    fake.control("reset_stats")
    first = connect(fake.ws_url("/ws/dotusdt@trade"))
    second = connect(fake.ws_url("/stream?streams=dotusdt@trade"))
    got = [e["t"] for e in receive_for(first, 1.0)] + [m["data"]["t"] for m in receive_for(second, 0.2)]
    stats = fake.stats()
    first.close()
    second.close()
    conns = stats["connections"]
    assert conns["open"] == 2 and conns["opened_total"] == 2
    assert conns["max_open_per_streamset"] == {"dotusdt@trade": 2}
    assert sorted((c["streams"], c["combined"]) for c in stats["open_connections"]) == [
        (["dotusdt@trade"], False),
        (["dotusdt@trade"], True),
    ]
    sent = stats["sent"]["DOTUSDT"]["trade"]
    assert sent["first"] <= min(got) and sent["last"] >= max(got) and sent["count"] >= len(got)
    assert sent["count"] <= 2 * (sent["last"] - sent["first"] + 1)  # two sockets at most
    assert stats["messages_sent_total"] >= sent["count"]
    assert list(stats["sent"]) == ["DOTUSDT"]
    assert stats["rest"]["requests"] == 0  # /fake/ calls are not Binance requests
    fake.get("/api/v3/ping")
    fake.get("/api/v3/klines?symbol=NOPE&interval=1m")
    rest = fake.stats()["rest"]
    assert (rest["requests"], rest["by_status"]) == (2, {"200": 1, "400": 1})


def test_sigint_also_exits_cleanly_with_open_connections() -> None:
    fake = Fake()
    try:
        ws = connect(fake.ws_url("/ws/btcusdt@trade"))
        ws.recv()
        started = time.monotonic()
        assert fake.stop(signal.SIGINT) == 0
        assert time.monotonic() - started < 5
        ws.shutdown()
    finally:
        fake.proc.kill()
