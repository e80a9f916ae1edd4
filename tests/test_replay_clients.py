"""ccxt pro and cryptofeed, unmodified but for their base URLs, on `binance-recorder
replay` of a real stack's recording of the fake exchange (the scripts in examples/ that
docs/replay.md shows): each receives the recorded trades and ends with the book that
`binance-recorder book` rebuilds at the replay clock. And the REST endpoints those
clients (and python-binance) call, answered at the clock.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import websocket

from tests.replay_recording import ROOT, SYMBOL, Recording, rebuilt_top, rows, run_client_script, window_rows

RECORD_GAP = False
"""The clients replay the clean window: the recording needs no lost stretch (tests/conftest.py)."""


def test_ccxt_pro_gets_the_trades_and_ends_with_the_rebuilt_book(recording: Recording, replay_of: Any) -> None:
    replay = replay_of("--speed", "1")  # the book subscribes while the window is being sent
    trades, book = run_client_script("ccxt_replay.py", replay)
    assert trades == window_rows(recording, "trades", "trade_id")
    assert book["clock"] == recording.end and book["updates"] > 1  # the snapshot, then diffs
    assert (book["bids"], book["asks"]) == rebuilt_top(recording, book["clock"])


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as `openssl req` makes one."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_cryptofeed_gets_the_trades_and_ends_with_the_rebuilt_book(
    recording: Recording, replay_of: Any, certificate: tuple[Path, Path]
) -> None:
    """cryptofeed takes only wss:// websocket URLs: the replay serves TLS, the client trusts its certificate."""
    cert, key = certificate
    replay = replay_of("--speed", "1", "--certfile", str(cert), "--keyfile", str(key))
    assert replay.ws.startswith("wss://") and replay.http.startswith("https://")
    trusting = {**os.environ, "SSL_CERT_FILE": str(cert), "REQUESTS_CA_BUNDLE": str(cert)}
    trades, book = run_client_script("cryptofeed_replay.py", replay, env=trusting)
    assert trades == window_rows(recording, "agg_trades", "agg_id")  # cryptofeed's TRADES are aggTrade
    assert book["clock"] == recording.end and book["updates"] > 1
    assert (book["bids"], book["asks"]) == rebuilt_top(recording, book["clock"])


@pytest.mark.parametrize("script", ["python_binance_replay.py", "ccxt_replay.py", "cryptofeed_replay.py"])
def test_the_docs_show_the_scripts_the_tests_run(script: str) -> None:
    text = (ROOT / "examples" / script).read_text()
    assert f"```python\n{text}```" in (ROOT / "docs" / "replay.md").read_text()


def test_the_ccxt_lines_the_docs_name_are_the_scripts() -> None:
    docs = (ROOT / "docs" / "replay.md").read_text()
    changed = docs.split("### ccxt pro, unmodified", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script_lines = {line.split("  #", 1)[0] for line in (ROOT / "examples" / "ccxt_replay.py").read_text().splitlines()}
    assert set(changed.splitlines()) <= script_lines


def test_a_path_name_that_is_no_stream_subscribes_nothing(recording: Recording, replay_of: Any) -> None:
    """ccxt opens /ws/0 and then SUBSCRIBEs: the connection alone must not start the clock."""
    replay = replay_of("--speed", "max")
    socket = websocket.create_connection(f"{replay.ws}/ws/0", timeout=10)
    socket.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 1}))
    assert json.loads(socket.recv()) == {"result": [], "id": 1}
    assert replay.get("/api/v3/time").json()["serverTime"] == recording.start
    socket.send(json.dumps({"method": "SUBSCRIBE", "params": [f"{SYMBOL.lower()}@trade"], "id": 2}))
    assert json.loads(socket.recv()) == {"result": None, "id": 2}
    assert json.loads(socket.recv())["t"] == window_rows(recording, "trades", "trade_id")[0]
    socket.close()


def test_futures_listings_are_empty_and_listings_take_symbols(recording: Recording, replay_of: Any) -> None:
    replay = replay_of()
    for path in ("/fapi/v1/exchangeInfo", "/dapi/v1/exchangeInfo"):
        listing = replay.get(path)
        assert listing.status_code == 200 and listing.json()["symbols"] == []
        assert listing.json()["serverTime"] == recording.start and listing.headers["X-MBX-USED-WEIGHT-1M"]
    [listed] = replay.get("/api/v3/exchangeInfo", symbols=json.dumps([SYMBOL])).json()["symbols"]
    assert listed["symbol"] == SYMBOL and listed["filters"][0]["filterType"] == "PRICE_FILTER"
    for params, code in (
        ({"symbols": json.dumps(["XRPUSDT"])}, -1121),
        ({"symbols": "BTCUSDT"}, -1100),
        ({"symbol": SYMBOL, "symbols": json.dumps([SYMBOL])}, -1128),
    ):
        refused = replay.get("/api/v3/exchangeInfo", **params)
        assert refused.status_code == 400 and refused.json()["code"] == code, params
    both = replay.get("/api/v3/ticker/bookTicker", symbols=json.dumps([SYMBOL]))
    assert both.status_code == 200 and [ticker["symbol"] for ticker in both.json()] == [SYMBOL]


def test_trade_lists_take_binances_parameters_each(recording: Recording, replay_of: Any) -> None:
    """/trades takes only a limit, /historicalTrades a fromId too, /aggTrades a fromId or a time range;
    each answers from the rows received up to the clock (here standing at the start)."""
    replay = replay_of()
    received = [
        row[0]
        for row in rows(
            recording.engine,
            "select trade_id from trades where symbol = :s and received_at <= :c order by trade_id",
            s=SYMBOL,
            c=recording.start,
        )
    ]
    first = received[-5]

    def ids(path: str, **params: Any) -> list[int]:
        answer = replay.get(path, symbol=SYMBOL, **params)
        assert answer.status_code == 200, answer.text
        return [row["id"] for row in answer.json()]

    assert ids("/api/v3/trades", limit=3, fromId=first) == received[-3:]  # fromId is no parameter of /trades
    assert ids("/api/v3/historicalTrades", limit=2, fromId=first) == received[-5:-3]
    assert ids("/api/v3/historicalTrades", limit=2) == received[-2:]
    [(agg_id, trade_time)] = rows(
        recording.engine,
        "select agg_id, trade_time from agg_trades where symbol = :s and received_at <= :c "
        "order by agg_id desc limit 1",
        s=SYMBOL,
        c=recording.start,
    )
    by_time = replay.get("/api/v3/aggTrades", symbol=SYMBOL, startTime=trade_time, endTime=trade_time).json()
    assert [row["a"] for row in by_time] == [agg_id]
    assert [row["a"] for row in replay.get("/api/v3/aggTrades", symbol=SYMBOL, fromId=agg_id).json()] == [agg_id]
    too_long = replay.get("/api/v3/aggTrades", symbol=SYMBOL, startTime=0, endTime=3_600_001)
    assert too_long.status_code == 400 and too_long.json()["code"] == -1127
