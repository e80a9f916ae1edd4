"""The fake exchange's market-load mode: its listing and skew, and what a client of a
real fake process in that mode receives (ids, depth continuity, the ledger)."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from decimal import Decimal
from typing import Any

import pytest

from fake_binance.listing import KINDS, REAL_SYMBOLS, LoadPlan, market_symbols
from fake_binance.load import Schedule
from tests.test_fake_exchange import Fake, connect, receive_for, running_fake

SYMBOLS = 50
RATE = 3000


def test_the_listing_names_the_busiest_real_symbols_first_then_distinct_generated_ones() -> None:
    symbols = market_symbols(1500)
    assert len(set(symbols)) == 1500
    assert symbols[: len(REAL_SYMBOLS)] == REAL_SYMBOLS
    assert all(re.fullmatch(r"[A-Z]{3,12}", s) for s in symbols)
    generated = symbols[len(REAL_SYMBOLS) :]
    assert {s[-4:] for s in generated} >= {"USDT"} and any(s.endswith("BTC") for s in generated)


def test_the_plan_is_zipf_skewed_and_sums_to_the_total() -> None:
    plan = LoadPlan.build(1500, 40_000)
    assert sum(sum(rates) for rates in plan.rates.values()) == pytest.approx(40_000)
    assert plan.top_share(10) > 0.5 > plan.top_share(1) > 0.2  # a few carry most of it
    assert max(plan.rates["depth@100ms"]) == 10  # one diff per 100 ms at most
    assert min(plan.rates["trade"]) > 0
    assert LoadPlan.build(1500, 40_000, exponent=1.0).top_share(10) < plan.top_share(10)
    assert Schedule(plan).messages_per_second == pytest.approx(40_000, rel=0.01)


@pytest.fixture(scope="module")
def load_fake() -> Any:
    flags = ("--market-load-rate", str(RATE), "--market-load-symbols", str(SYMBOLS), "--trades-per-second", "5")
    with running_fake(*flags) as fake:
        yield fake


def test_exchange_info_lists_the_load_symbols(load_fake: Fake) -> None:
    status, _, info = load_fake.get("/api/v3/exchangeInfo")
    assert status == 200
    assert [s["symbol"] for s in info["symbols"]] == list(market_symbols(SYMBOLS))


def test_a_client_gets_consecutive_ids_chained_depth_and_the_ledger_counts_them(load_fake: Fake) -> None:
    symbols = ("BTCUSDT", market_symbols(SYMBOLS)[-1])  # the busiest and the quietest
    names = [f"{s.lower()}@{kind}" for s in symbols for kind in KINDS]
    load_fake.control("reset_stats")
    ws = connect(load_fake.ws_url("/stream?streams=" + "/".join(names)))
    events = receive_for(ws, 3.0)
    snapshot = load_fake.get("/api/v3/depth?symbol=BTCUSDT&limit=1000")[2]  # the book 500 ms ago
    events += receive_for(ws, 1.0)
    load_fake.control("pause_data", seconds=60)
    try:
        events += receive_for(ws, 1.0)  # what was in flight when the pause began
        sent = load_fake.stats()["sent"]
    finally:
        load_fake.control("pause_data", seconds=0)  # the other tests' fake sends again
        ws.close()
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_stream.setdefault(event["stream"], []).append(event["data"])
    plan = LoadPlan.build(SYMBOLS, RATE)
    busiest = by_stream["btcusdt@trade"]
    assert len(busiest) > plan.rates["trade"][0] * 3  # about the planned rate over 4 s
    for symbol in symbols:
        for kind, field in (("trade", "t"), ("aggTrade", "a")):
            ids = [e[field] for e in by_stream.get(f"{symbol.lower()}@{kind}", [])]
            assert ids == list(range(ids[0], ids[0] + len(ids))) if ids else True
            ledger = sent[symbol].get(kind, {"count": 0})
            assert ledger["count"] == len(ids)
            if ids:
                assert (ledger["first"], ledger["last"]) == (ids[0], ids[-1])
    depth = by_stream["btcusdt@depth@100ms"]
    assert len(depth) >= 5
    assert all(b["U"] == a["u"] + 1 for a, b in zip(depth, depth[1:], strict=False))
    assert_snapshot_continues_into(snapshot, depth, load_fake)


def test_a_client_that_reconnects_gets_the_next_ids_not_the_same_again(load_fake: Fake) -> None:
    url = load_fake.ws_url("/stream?streams=ethusdt@trade")
    ws = connect(url)
    first = [e["data"]["t"] for e in receive_for(ws, 1.0)]
    ws.close()
    deadline = time.monotonic() + 10
    while load_fake.stats()["connections"]["open"]:
        assert time.monotonic() < deadline, "the fake kept the closed connection"
        time.sleep(0.05)
    last_sent = load_fake.stats()["sent"]["ETHUSDT"]["trade"]["last"]
    ws = connect(url)
    again = [e["data"]["t"] for e in receive_for(ws, 1.0)]
    ws.close()
    assert first and again and last_sent >= first[-1]
    assert again[0] == last_sent + 1  # the stream went on where it stopped


def assert_snapshot_continues_into(snapshot: dict[str, Any], depth: list[dict[str, Any]], fake: Fake) -> None:
    """Binance's recipe: the first event after the snapshot has U <= lastUpdateId + 1 <= u,
    and the snapshot with the events applied is the fake's own book at the last u."""
    last_id = snapshot["lastUpdateId"]
    after = [e for e in depth if e["u"] > last_id]
    assert after and after[0]["U"] <= last_id + 1 <= after[0]["u"]
    book = {side: {Decimal(p): q for p, q in snapshot[side]} for side in ("bids", "asks")}
    for event in after:
        for side, key in (("bids", "b"), ("asks", "a")):
            for price, qty in event[key]:
                if Decimal(qty) == 0:
                    book[side].pop(Decimal(price), None)
                else:
                    book[side][Decimal(price)] = qty
    truth = fake.get(f"/fake/book?symbol=BTCUSDT&update_id={after[-1]['u']}")[2]
    for side, best_first in (("bids", True), ("asks", False)):
        ours = sorted(book[side].items(), reverse=best_first)[:20]
        assert [(str(p), q) for p, q in ours] == [(str(Decimal(p)), q) for p, q in truth[side][:20]]


def test_the_load_rate_is_steered_at_run_time_and_refused_without_the_mode(load_fake: Fake) -> None:
    answer = load_fake.control("set_load_rate", messages_per_second=RATE / 2)
    assert answer["scheduled_messages_per_second"] == pytest.approx(RATE / 2, rel=0.05)
    with running_fake() as plain:
        body = json.dumps({"action": "set_load_rate", "messages_per_second": 1000}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{plain.port}/fake/control", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 400 and "market-load" in json.loads(refused.value.read())["error"]
