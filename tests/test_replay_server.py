"""`binance-recorder replay` as a real process, on a recording a real stack made of the
fake exchange (trades and depth@100ms of BTCUSDT, with a lost stretch of depth that the
drain recorded as a gap), to plain websocket clients and to python-binance unmodified
but for its base URLs (examples/python_binance_replay.py, the script docs/replay.md shows).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import websocket
from sqlalchemy import delete

from tests.conftest import wait_until
from tests.replay_recording import (
    ROOT,
    SYMBOL,
    Recording,
    Replay,
    rebuilt_top,
    rows,
    run_cli,
    run_client_script,
    window_rows,
)
from worker.exchange.listings import keep_daily_snapshot
from worker.replay.binance_api import symbol_info
from worker.store.storage import exchange_info_snapshots
from worker.streams import SPOT
from worker.times import utc_datetime


def receive(socket: websocket.WebSocket) -> Any:
    return json.loads(socket.recv())


def test_the_websocket_speaks_binances_protocol(recording: Recording, replay_of: Any) -> None:
    replay = replay_of("--speed", "2")  # slow enough that frames still come after the second subscription
    assert replay.get("/api/v3/time").json() == {"serverTime": recording.start}  # it stands until a subscription
    socket = websocket.create_connection(f"{replay.ws}/ws", timeout=10)
    socket.send(json.dumps({"method": "SUBSCRIBE", "params": [f"{SYMBOL.lower()}@trade"], "id": 1}))
    assert receive(socket) == {"result": None, "id": 1}  # the acknowledgement before any frame
    first = receive(socket)
    assert first["e"] == "trade" and first["t"] == window_rows(recording, "trades", "trade_id")[0]

    socket.send(json.dumps({"method": "SUBSCRIBE", "params": [f"{SYMBOL.lower()}@depth@100ms"], "id": "two"}))
    answers = []
    while not answers or answers[-1] != {"result": None, "id": "two"}:
        answers.append(receive(socket))
        assert answers[-1].get("e") != "depthUpdate", "a diff came before its acknowledgement"
    diff = receive(socket)
    while diff.get("e") != "depthUpdate":
        diff = receive(socket)
    socket.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 3}))
    socket.send(json.dumps({"method": "SET_PROPERTY", "params": ["combined", True], "id": 4}))
    replies = replies_by_id(socket, {3, 4})
    assert replies[3]["result"] == [f"{SYMBOL.lower()}@trade", f"{SYMBOL.lower()}@depth@100ms"]
    enveloped = receive(socket)
    assert set(enveloped) == {"stream", "data"} and enveloped["stream"].startswith(SYMBOL.lower())

    for request, code in (
        ("not json", 3),
        (json.dumps({"method": "FETCH", "id": 5}), 2),
        (json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": -1}), 2),
        (json.dumps({"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 6}), 1),
        (json.dumps({"method": "GET_PROPERTY", "params": ["speed"], "id": 7}), 0),
    ):
        socket.send(request)
        error = next(message for message in iter(lambda: receive(socket), None) if "error" in message)
        assert error["error"]["code"] == code and error["error"]["msg"], request
    socket.pong(b"unasked")  # taken without a word, as Binance takes them
    socket.send(json.dumps({"method": "GET_PROPERTY", "params": ["combined"], "id": 8}))
    assert replies_by_id(socket, {8})[8]["result"] is True
    socket.ping(b"are you there")
    while (frame := socket.recv_data(control_frame=True))[0] != websocket.ABNF.OPCODE_PONG:
        pass
    assert frame[1] == b"are you there"
    socket.close()


def replies_by_id(socket: websocket.WebSocket, ids: set[Any]) -> dict[Any, Any]:
    replies: dict[Any, Any] = {}
    while set(replies) != ids:
        message = receive(socket)
        if "id" in message and "result" in message:
            replies[message["id"]] = message
    return replies


def test_raw_and_combined_sockets_carry_every_recorded_trade_and_rest_answers_at_the_clock(
    recording: Recording, replay_of: Any
) -> None:
    replay = replay_of("--speed", "10")
    stream = f"{SYMBOL.lower()}@trade"
    raw = websocket.create_connection(f"{replay.ws}/ws/{stream}", timeout=10)
    combined = websocket.create_connection(f"{replay.ws}/stream?streams={stream}", timeout=10)
    expected = window_rows(recording, "trades", "trade_id")
    assert [receive(raw)["t"] for _ in expected] == expected  # every one, in order, nothing dropped
    envelopes = [receive(combined)]
    while envelopes[-1]["data"]["t"] != expected[-1]:
        envelopes.append(receive(combined))
    joined = expected.index(envelopes[0]["data"]["t"])  # it joined the running replay
    assert [envelope["data"]["t"] for envelope in envelopes] == expected[joined:]
    assert {envelope["stream"] for envelope in envelopes} == {stream}

    wait_until(lambda: replay.get("/replay/status").json()["ended"], 30, "the window sent")
    assert replay.get("/api/v3/time").json()["serverTime"] == recording.end
    answer = replay.get("/api/v3/depth", symbol=SYMBOL, limit=5)
    last_diff = rows(
        recording.engine,
        "select max(final_update_id) from depth_updates where symbol = :s and received_at < :e",
        s=SYMBOL,
        e=recording.end,
    )[0][0]
    assert answer.json()["lastUpdateId"] == last_diff and len(answer.json()["bids"]) == 5
    assert answer.headers["X-MBX-USED-WEIGHT-1M"]
    latest = replay.get("/api/v3/trades", symbol=SYMBOL, limit=3).json()
    assert [trade["id"] for trade in latest] == expected[-3:]  # nothing received after the clock
    latest_agg = replay.get("/api/v3/aggTrades", symbol=SYMBOL, limit=2).json()
    assert [trade["a"] for trade in latest_agg] == window_rows(recording, "agg_trades", "agg_id")[-2:]
    best = replay.get("/api/v3/ticker/bookTicker", symbol=SYMBOL).json()
    [(bid, ask)] = rows(
        recording.engine,
        "select bid_price, ask_price from book_tickers where symbol = :s and received_at < :e "
        "order by update_id desc limit 1",
        s=SYMBOL,
        e=recording.end,
    )
    assert (float(best["bidPrice"]), float(best["askPrice"])) == (bid, ask)
    assert [s["symbol"] for s in replay.get("/api/v3/exchangeInfo").json()["symbols"]] == [SYMBOL]
    assert replay.get("/api/v3/ping").json() == {}
    for params, code in (({}, -1102), ({"symbol": "XRPUSDT"}, -1121), ({"symbol": SYMBOL, "limit": 0}, -1130)):
        refused = replay.get("/api/v3/depth", **params)
        assert refused.status_code == 400 and refused.json()["code"] == code
    assert "frames sent" in replay.stop()


@pytest.mark.slow  # 24 s measured: python-binance notices a close only after 10 s without a frame
def test_python_binance_gets_the_trades_and_ends_with_the_rebuilt_book(recording: Recording, replay_of: Any) -> None:
    trades, book = run_client_script("python_binance_replay.py", replay_of("--speed", "10"), timeout=120)
    assert trades == window_rows(recording, "trades", "trade_id")
    assert book["clock"] == recording.end
    assert (book["bids"], book["asks"]) == rebuilt_top(recording, book["clock"])


def test_a_recorded_gap_closes_the_connection_and_a_reconnect_resyncs_after_it(
    recording: Recording, replay_of: Any
) -> None:
    replay = replay_of("--speed", "max", start=recording.gap_begins - 2000, end=recording.after_gap)
    [gap] = replay.get("/replay/gaps").json()
    assert gap["kind"] == "depth" and gap["symbol"] == SYMBOL and gap["begins"] == recording.gap_begins
    stream = f"{SYMBOL.lower()}@depth@100ms"
    socket = websocket.create_connection(f"{replay.ws}/ws/{stream}", timeout=10)
    diffs, close = frames_until_close(socket)
    assert int.from_bytes(close[:2], "big") == 1001  # closed at the gap, as Binance's disconnect
    assert b"recorded gap in BTCUSDT depth" in close
    assert diffs and diffs[-1]["E"] <= recording.gap_begins
    socket = websocket.create_connection(f"{replay.ws}/ws/{stream}", timeout=10)
    snapshot = replay.get("/api/v3/depth", symbol=SYMBOL, limit=5000).json()
    assert snapshot["lastUpdateId"] > diffs[-1]["u"] + 1  # the book recorded after the gap, not before it
    book = {side: {float(p): float(q) for p, q in snapshot[side]} for side in ("bids", "asks")}
    applied = snapshot["lastUpdateId"]
    last = last_sent_at_the_end(replay)
    while applied != last:
        diff = receive(socket)
        if diff["u"] <= applied:
            continue
        assert diff["U"] <= applied + 1, "a diff is missing after the resync"
        for side, key in (("bids", "b"), ("asks", "a")):
            for price, qty in diff[key]:
                book[side][float(price)] = float(qty)
        applied = diff["u"]
    book = {side: {price: qty for price, qty in levels.items() if qty} for side, levels in book.items()}
    rebuilt = json.loads(run_cli(recording.env, "book", SYMBOL, "--at", str(recording.after_gap), "--json").stdout)
    assert applied == rebuilt["update_id"]
    assert sorted(book["bids"].items(), reverse=True)[:10] == [tuple(level) for level in rebuilt["bids"][:10]]
    assert sorted(book["asks"].items())[:10] == [tuple(level) for level in rebuilt["asks"][:10]]


def frames_until_close(socket: websocket.WebSocket) -> tuple[list[Any], bytes]:
    """The frames a socket receives until it is closed, and the close frame's code and reason."""
    frames = []
    while True:
        opcode, data = socket.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return frames, data
        frames.append(json.loads(data))


def last_sent_at_the_end(replay: Replay) -> int:
    """`u` of the last diff of the window, once the replay has sent it."""
    status = wait_until(lambda: (s := replay.get("/replay/status").json())["ended"] and s, 30, "the window sent")
    return int(status["lastDiffs"][SYMBOL]["u"])


def test_gaps_continue_sends_on(recording: Recording, replay_of: Any) -> None:
    replay = replay_of(
        "--speed", "max", "--gaps", "continue", start=recording.gap_begins - 500, end=recording.after_gap
    )
    socket = websocket.create_connection(f"{replay.ws}/ws/{SYMBOL.lower()}@depth@100ms", timeout=10)
    diffs = [receive(socket)]
    last = last_sent_at_the_end(replay)
    while diffs[-1]["u"] != last:
        diffs.append(receive(socket))
    breaks = [later for earlier, later in zip(diffs, diffs[1:], strict=False) if later["U"] > earlier["u"] + 1]
    assert len(breaks) == 1  # the lost stretch went by, the socket stayed open


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--symbols", "XRPUSDT"], "no recorded XRPUSDT rows"),
        (["--streams", "kline_1m"], "no kline_1m frames were recorded in the window"),
        (["--speed", "fast"], "--speed 'fast'"),
        (["--end", "1000000000000"], "is not before the end"),
        (["--certfile", "cert.pem"], "--certfile and --keyfile go together"),
        (["--certfile", "missing.pem", "--keyfile", "missing.key"], "cannot use --certfile missing.pem"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(recording: Recording, args: list[str], says: str) -> None:
    window = ["--start", str(recording.start), "--end", str(recording.end), "--port", "0"]
    done = run_cli(recording.env, "replay", *window, *args)
    assert done.returncode == 2 and says in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_port_in_use_is_one_line_and_exit_2(recording: Recording, replay_of: Any) -> None:
    replay = replay_of()
    port = replay.http.rsplit(":", 1)[1]
    done = run_cli(
        recording.env, "replay", "--start", str(recording.start), "--end", str(recording.end), "--port", port
    )
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert done.stderr.count("\n") == 1


def test_the_docs_show_the_script_the_test_runs() -> None:
    script = (ROOT / "examples" / "python_binance_replay.py").read_text()
    assert f"```python\n{script}```" in (ROOT / "docs" / "replay.md").read_text()


def test_exchange_info_serves_the_listing_kept_for_the_clocks_day(recording: Recording, replay_of: Any) -> None:
    """The listing follower keeps the day's first exchangeInfo; the replay serves the
    recorded symbols' entries from it (their tick size here), nothing it lacks."""
    entry = symbol_info(SYMBOL, "TRADING", ({"filterType": "PRICE_FILTER", "tickSize": "0.01000000"},))
    other = symbol_info("XRPUSDT", "TRADING")
    listing = {"timezone": "UTC", "symbols": [other, entry]}
    day = utc_datetime(recording.start).strftime("%Y-%m-%d")
    before = replay_of().get("/api/v3/exchangeInfo").json()["symbols"]
    assert before[0]["filters"][0]["tickSize"] == "0.00000000"  # none kept: the price filter disabled
    try:
        assert keep_daily_snapshot(recording.engine, SPOT, listing, recording.start)
        assert replay_of().get("/api/v3/exchangeInfo").json()["symbols"] == [entry]
    finally:
        with recording.engine.begin() as conn:
            conn.execute(delete(exchange_info_snapshots).where(exchange_info_snapshots.c.day == day))


def test_rest_never_answers_a_row_received_at_the_end_which_was_not_sent(recording: Recording, replay_of: Any) -> None:
    """The window is [start, end): once it is sent the clock stands at `--end`, and a trade
    received exactly then was never sent, so REST does not know it either."""
    [(trade_id, received_at)] = rows(
        recording.engine,
        "select trade_id, received_at from trades where symbol = :s and received_at > :a order by trade_id limit 1",
        s=SYMBOL,
        a=recording.start + 2000,
    )
    replay = replay_of("--speed", "max", end=received_at)
    socket = websocket.create_connection(f"{replay.ws}/ws/{SYMBOL.lower()}@trade", timeout=10)
    sent = []
    while not sent or sent[-1] < trade_id - 1:
        sent.append(receive(socket)["t"])
    wait_until(lambda: replay.get("/replay/status").json()["ended"], 30, "the window sent")
    socket.close()
    [latest] = replay.get("/api/v3/trades", symbol=SYMBOL, limit=1).json()
    assert latest["id"] == sent[-1] == window_rows(recording, "trades", "trade_id", end=received_at)[-1]
    assert trade_id not in sent
