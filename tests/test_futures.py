"""Futures frames into the futures markets' tables, through the real drain.

Every frame of every file in tests/fixtures/futures/ (real frames captured from
Binance, and frames written after Binance's documentation for the kinds the captures
lack: see the README there) is pushed into its market's Redis list as a websocket task
would, drained into a real database (a SQLite file, and PostgreSQL), and read back:
every column of every row must equal what this test's own mapping from Binance's
field letters (`MAPPINGS`, written here, not the parser's) says, and every field of
every event must be read by that mapping or be one that is not stored on purpose.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.engine import Engine

from worker.buffer import FrameBuffer, FrameWriter
from worker.exchange.listings import ListingWatch
from worker.groups import Group, GroupRegistry, InvalidSubscription, normalize_stream_kinds, stream_names
from worker.keys import RedisKeys
from worker.store.drain import Drainer
from worker.store.parsing import parse_frames
from worker.store.partitions import PARTITIONED_TABLES
from worker.store.storage import FUTURES_TABLES, TABLES, TIME_COLUMNS, listing_changes
from worker.streams import (
    COINM,
    FUTURES_MARKETS,
    MARKETS,
    SPOT,
    USDM,
    market_named,
    market_of_st,
    stream_kind,
    stream_subject,
)

FIXTURES = Path(__file__).parent / "fixtures" / "futures"
FILES = sorted(FIXTURES.glob("*.jsonl"))
FILE_MARKET = {"um": "usdm", "cm": "coinm"}  # futures_um_*, docs_examples_cm...
ST_MARKET = {1: "usdm", 2: "coinm"}  # Binance's `st`
KLINE_TABLES = {"klines", "continuous_klines", "mark_price_klines", "index_price_klines"}  # open ones are replaced


def file_market(path: Path) -> str:
    return FILE_MARKET[re.search(r"_(um|cm)[_.]", path.name)[1]]  # type: ignore[index]


# --- The test's own mapping from Binance's payloads to columns -----------------------


class Fields:
    """An event's fields as the mapping reads them; remembers which were read."""

    def __init__(self, payload: dict[str, Any], path: str = "") -> None:
        self.payload = payload
        self.path = path
        self.read: set[str] = set()
        self.children: list[Fields] = []

    def __getitem__(self, name: str) -> Any:
        self.read.add(name)
        return self.payload[name]

    def get(self, name: str) -> Any:
        self.read.add(name)
        return self.payload.get(name)

    def obj(self, name: str) -> Fields:
        self.read.add(name)
        child = Fields(self.payload[name], f"{self.path}{name}.")
        self.children.append(child)
        return child

    def unread(self) -> set[str]:
        mine = {self.path + name for name in self.payload if name not in self.read}
        return mine.union(*(child.unread() for child in self.children))


def dec(value: str | None) -> float | None:
    """A decimal string as stored; absent or "" (no funding) is NULL."""
    return None if value in (None, "") else float(value)


def levels(pairs: list[list[str]]) -> bytes:
    """Levels as stored: little-endian float64 price, quantity pairs (docs/order-books.md)."""
    return struct.pack(f"<{2 * len(pairs)}d", *(float(x) for pair in pairs for x in pair))


def trade(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "trades", {
        "symbol": d["s"], "trade_id": d["t"], "price": dec(d["p"]), "qty": dec(d["q"]),
        "trade_time": d["T"], "buyer_is_maker": d["m"], "event_time": d["E"], "trade_type": d.get("X"),
    }  # fmt: skip


def agg_trade(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "agg_trades", {
        "symbol": d["s"], "agg_id": d["a"], "price": dec(d["p"]), "qty": dec(d["q"]),
        "first_trade_id": d["f"], "last_trade_id": d["l"], "trade_time": d["T"],
        "buyer_is_maker": d["m"], "event_time": d["E"], "normal_qty": dec(d.get("nq")),
    }  # fmt: skip


def candle(k: Fields) -> dict[str, Any]:
    return {
        "interval": k["i"], "open_time": k["t"], "close_time": k["T"],
        "open": dec(k["o"]), "high": dec(k["h"]), "low": dec(k["l"]), "close": dec(k["c"]), "is_closed": k["x"],
    }  # fmt: skip


def volumes(k: Fields) -> dict[str, Any]:
    return {
        "volume": dec(k["v"]), "quote_volume": dec(k["q"]), "trade_count": k["n"],
        "taker_buy_base_volume": dec(k["V"]), "taker_buy_quote_volume": dec(k["Q"]),
    }  # fmt: skip


def kline(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    k = d.obj("k")
    assert k["s"] == d["s"]
    return "klines", {
        "symbol": d["s"], **candle(k), **volumes(k),
        "first_trade_id": k["f"], "last_trade_id": k["L"], "event_time": d["E"],
    }  # fmt: skip


def continuous_kline(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    k = d.obj("k")
    return "continuous_klines", {
        "pair": d["ps"], "contract_type": d["ct"], **candle(k), **volumes(k),
        "first_update_id": k["f"], "last_update_id": k["L"], "event_time": d["E"],
    }  # fmt: skip


def mark_price_kline(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    k = d.obj("k")
    return "mark_price_klines", {"symbol": k["s"], **candle(k), "event_time": d["E"]}


def index_price_kline(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    k = d.obj("k")
    return "index_price_klines", {"pair": d["ps"], **candle(k), "event_time": d["E"]}


def ticker(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "tickers", {
        "symbol": d["s"], "event_time": d["E"], "price_change": dec(d["p"]),
        "price_change_percent": dec(d["P"]), "weighted_avg_price": dec(d["w"]),
        "last_price": dec(d["c"]), "last_qty": dec(d["Q"]), "open_price": dec(d["o"]),
        "high_price": dec(d["h"]), "low_price": dec(d["l"]), "base_volume": dec(d["v"]),
        "quote_volume": dec(d["q"]), "open_time": d["O"], "close_time": d["C"],
        "first_trade_id": d["F"], "last_trade_id": d["L"], "trade_count": d["n"],
    }  # fmt: skip


def mini_ticker(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "mini_tickers", {
        "symbol": d["s"], "event_time": d["E"], "close_price": dec(d["c"]), "open_price": dec(d["o"]),
        "high_price": dec(d["h"]), "low_price": dec(d["l"]), "base_volume": dec(d["v"]),
        "quote_volume": dec(d["q"]),
    }  # fmt: skip


def book_ticker(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "book_tickers", {
        "symbol": d["s"], "update_id": d["u"], "bid_price": dec(d["b"]), "bid_qty": dec(d["B"]),
        "ask_price": dec(d["a"]), "ask_qty": dec(d["A"]), "event_time": d["E"], "transaction_time": d["T"],
    }  # fmt: skip


def depth(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    """A diff event, or (`@depth<N>`, the same object) the top N levels."""
    common = {
        "symbol": d["s"], "first_update_id": d["U"], "prev_final_update_id": d["pu"],
        "event_time": d["E"], "transaction_time": d["T"], "bids": levels(d["b"]), "asks": levels(d["a"]),
    }  # fmt: skip
    partial = re.search(r"@depth(\d+)", stream or "")
    if partial:
        return "partial_depth", {**common, "levels": int(partial[1]), "last_update_id": d["u"]}
    return "depth_updates", {**common, "final_update_id": d["u"]}


def mark_price(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "mark_prices", {
        "symbol": d["s"], "event_time": d["E"], "mark_price": dec(d["p"]), "index_price": dec(d.get("i")),
        "estimated_settle_price": dec(d.get("P")), "funding_rate": dec(d.get("r")),
        "next_funding_time": d["T"] or None,  # 0: a delivery contract, no funding
    }  # fmt: skip


def liquidation(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    o = d.obj("o")
    return "liquidations", {
        "symbol": o["s"], "side": o["S"], "order_type": o["o"], "time_in_force": o["f"],
        "orig_qty": dec(o["q"]), "price": dec(o["p"]), "avg_price": dec(o["ap"]), "status": o["X"],
        "last_filled_qty": dec(o["l"]), "accumulated_qty": dec(o["z"]), "trade_time": o["T"], "event_time": d["E"],
    }  # fmt: skip


def index_price(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "index_prices", {"pair": d["i"], "event_time": d["E"], "index_price": dec(d["p"])}


def composite_index(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "composite_index", {
        "symbol": d["s"], "event_time": d["E"], "price": dec(d["p"]),
        "component_type": d.get("C"), "components": d["c"],  # stored as JSON text
    }  # fmt: skip


def contract_info(d: Fields, stream: str | None) -> tuple[str, dict[str, Any]]:
    return "contract_info", {
        "symbol": d["s"], "event_time": d["E"], "pair": d["ps"], "contract_type": d["ct"],
        "delivery_date": d["dt"], "onboard_date": d["ot"], "status": d["cs"],
    }  # fmt: skip


MAPPINGS: dict[str, Callable[[Fields, str | None], tuple[str, dict[str, Any]]]] = {
    "trade": trade,
    "aggTrade": agg_trade,
    "kline": kline,
    "continuous_kline": continuous_kline,
    "markPrice_kline": mark_price_kline,
    "indexPrice_kline": index_price_kline,
    "24hrTicker": ticker,
    "24hrMiniTicker": mini_ticker,
    "bookTicker": book_ticker,
    "depthUpdate": depth,
    "markPriceUpdate": mark_price,
    "forceOrder": liquidation,
    "indexPriceUpdate": index_price,
    "compositeIndex": composite_index,
    "contractInfo": contract_info,
}
"""Event type -> (table without the market prefix, the row's columns but received_at and received_seq)."""

# Fields not stored, on purpose: the event type and the market (the table says them),
# the pair where the symbol says it, and what Binance documents as "ignore".
NOT_STORED = {"e", "st", "ps", "o.ps", "k.B"}
NOT_STORED_BY_EVENT = {
    "markPrice_kline": {"k.f", "k.L", "k.v", "k.n", "k.q", "k.V", "k.Q"},
    "indexPrice_kline": {"k.s", "k.f", "k.L", "k.v", "k.n", "k.q", "k.V", "k.Q"},
    "contractInfo": {"bks"},  # the leverage brackets: account limits, not market data
}


def event_market(event: dict[str, Any], list_market: str) -> str:
    st = event.get("st")
    return list_market if st is None else ST_MARKET[st]


def expected_rows(frames: list[tuple[str, bytes]], marks: dict[str, int]) -> dict[str, dict[tuple, dict[str, Any]]]:
    """Table -> natural key -> the row's columns, for frames (list market, frame) drained
    in this order, each market's in one flush (`push`): the first row of a key stays,
    except an open kline, which the next replaces."""
    expected: dict[str, dict[tuple, dict[str, Any]]] = {}
    places: Counter[str] = Counter()  # the next frame's place in its market's flush
    for list_market, raw in frames:
        place = places[list_market]
        places[list_market] += 1
        frame = json.loads(raw)
        stream = frame.get("stream")
        payload = frame.get("data", frame)
        for event in payload if isinstance(payload, list) else [payload]:
            fields = Fields(event)
            base, columns = MAPPINGS[event["e"]](fields, stream)
            assert fields.unread() <= NOT_STORED | NOT_STORED_BY_EVENT.get(event["e"], set()), event
            table = f"{event_market(event, list_market)}_{base}"
            row = {**columns, "received_at": marks[list_market], "received_seq": place}
            key = tuple(row[column.name] for column in TABLES[table].primary_key.columns)
            stored = expected.setdefault(table, {})
            if key not in stored or (base in KLINE_TABLES and not stored[key]["is_closed"]):
                stored[key] = row
    return expected


# --- Pushing and reading ---------------------------------------------------------------


def fixture_frames() -> list[tuple[str, bytes]]:
    """(market of the file, frame) of every line of every fixture file."""
    return [(file_market(path), line) for path in FILES for line in path.read_bytes().splitlines() if line.strip()]


def push(client: redis.Redis, keys: RedisKeys, frames: list[tuple[str, bytes]]) -> dict[str, int]:
    """Push each market's frames in one flush into its list, as a websocket task of
    that market does; returns the flushes' clock marks by market."""
    marks = {}
    for market in sorted({market for market, _ in frames}):
        group = f"g-{market}"
        FrameBuffer(client, keys).register(group, market)
        writer = FrameWriter(client, keys, group, max_pending=100_000, max_list_length=100_000, market=market)
        writer.pending.extend(frame for frame_market, frame in frames if frame_market == market)
        assert writer.flush() == sum(1 for frame_market, _ in frames if frame_market == market)
        marks[market] = int(client.lindex(keys.frames(group, market), 0)[1:])  # type: ignore[index]
    return marks


def drain(client: redis.Redis, keys: RedisKeys, engine: Engine) -> dict[str, int]:
    report = Drainer(client, keys, engine, batch_size=40).drain(time_budget=60)  # several batches per list
    assert report.dead_letters == 0, client.lrange(keys.dead_letters, 0, -1)
    assert all(client.llen(key) == 0 for key in FrameBuffer(client, keys).list_keys())
    return dict(report.rows)


def stored_rows(engine: Engine, table: str) -> dict[tuple, dict[str, Any]]:
    """The table's rows by natural key; components as the JSON they hold."""
    key_columns = [column.name for column in TABLES[table].primary_key.columns]
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(select(TABLES[table]))]
    for row in rows:
        for name, value in row.items():
            if isinstance(value, memoryview):
                row[name] = bytes(value)
        if "components" in row:
            row["components"] = json.loads(row["components"])
    return {tuple(row[name] for name in key_columns): row for row in rows}


def test_every_fixture_frame_is_stored_in_its_table_column_by_column(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    frames = fixture_frames()
    marks = push(redis_client, keys, frames)
    drain(redis_client, keys, engine)

    expected = expected_rows(frames, marks)
    for table in FUTURES_TABLES:
        stored = stored_rows(engine, table)
        assert set(stored) == set(expected.get(table, {})), table
        for key, row in expected.get(table, {}).items():
            assert set(row) == set(TABLES[table].columns.keys()), table  # the mapping names every column
            for column, value in row.items():
                assert stored[key][column] == value, (table, key, column)
    # The fixtures cover every kind of each market, and COIN-M events in USDⓈ-M's arrays.
    assert set(expected) == {market.table(kind) for market in FUTURES_MARKETS for kind in market.kinds}
    assert {"BTCUSD_PERP", "BTCUSD_251226"} <= {key[0] for key in expected["coinm_mark_prices"]}


def test_every_frame_stored_twice_is_stored_once(redis_client: redis.Redis, keys: RedisKeys, engine: Engine) -> None:
    frames = fixture_frames()
    push(redis_client, keys, frames)
    drain(redis_client, keys, engine)
    first = {table: stored_rows(engine, table) for table in FUTURES_TABLES}

    push(redis_client, keys, frames)  # a replay: a connection rotation's overlap, a drain retried
    written = drain(redis_client, keys, engine)

    again = {table: stored_rows(engine, table) for table in FUTURES_TABLES}
    assert {t: set(rows) for t, rows in again.items()} == {t: set(rows) for t, rows in first.items()}
    # Only open klines are written again (replaced by the same values, a later receive time).
    assert {table for table, count in written.items() if count} <= {t for t in FUTURES_TABLES if "klines" in t}
    for table, rows in first.items():
        for key, row in rows.items():
            assert {**again[table][key], "received_at": None} == {**row, "received_at": None}


FORCE_ORDER = json.loads((FIXTURES / "futures_um_ws_forceOrder.jsonl").read_text())


def liquidation_frame(**order: Any) -> bytes:
    return orjson.dumps({"stream": "!forceOrder@arr", "data": {**FORCE_ORDER, "o": {**FORCE_ORDER["o"], **order}}})


def test_two_liquidations_in_one_millisecond_are_two_rows(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    same_ms = [liquidation_frame(), liquidation_frame(q="2.5", z="2.5", l="2.5"), liquidation_frame()]
    push(redis_client, keys, [(USDM, frame) for frame in same_ms])
    drain(redis_client, keys, engine)
    rows = stored_rows(engine, "usdm_liquidations").values()
    assert sorted((row["trade_time"], row["orig_qty"]) for row in rows) == [
        (FORCE_ORDER["o"]["T"], 2.5),
        (FORCE_ORDER["o"]["T"], 1065.9),
    ]


def test_an_all_market_event_lands_in_the_table_of_the_market_its_st_names() -> None:
    usdm, coinm = {"e": "markPriceUpdate", "E": 5, "p": "1", "r": "", "T": 0}, {"st": 2}
    frames = [
        orjson.dumps({"stream": "!markPrice@arr", "data": [{**usdm, "s": "A", "st": 1}, {**usdm, "s": "B", **coinm}]}),
        orjson.dumps({"stream": "!markPrice@arr", "data": [{**usdm, "s": "C"}]}),  # no st: the list's market
        orjson.dumps({"stream": "!forceOrder@arr", "data": {**FORCE_ORDER, "o": {**FORCE_ORDER["o"], "st": 2}}}),
        orjson.dumps({"stream": "!markPrice@arr", "data": [{**usdm, "s": "D", "st": 1}, {**usdm, "s": "E", "st": 3}]}),
        orjson.dumps(
            {"stream": "btcusd@indexPrice", "data": {"e": "indexPriceUpdate", "E": 5, "i": "BTCUSD", "p": "1"}}
        ),
    ]
    batch = parse_frames(frames, USDM)
    symbols = {table: [row[0] for row in rows] for table, rows in batch.rows.items() if rows}
    assert symbols == {"usdm_mark_prices": ["A", "C"], "coinm_mark_prices": ["B"], "coinm_liquidations": ["BALUSDT"]}
    assert [dead.reason for dead in batch.dead_letters] == [
        "markPrice event: unknown market type st=3: Binance sends 1 (USDⓈ-M) or 2 (COIN-M)",  # the whole frame
        "unsupported stream kind 'indexPrice' (stream 'btcusd@indexPrice') in a usdm list",
    ]


def test_a_spot_list_is_parsed_as_spot() -> None:
    futures_ticker = json.loads((FIXTURES / "futures_um_ws_24hrTicker.jsonl").read_text().splitlines()[0])
    batch = parse_frames([orjson.dumps(futures_ticker)])
    assert batch.rows["tickers"] == [] and "usdm_tickers" not in batch.rows
    assert batch.dead_letters[0].reason == "ticker frame lacks field 'x'"  # spot's ticker has a previous close


def test_the_market_of_a_frame_list_is_in_its_name() -> None:
    keys = RedisKeys("binance")
    assert keys.frames("g1") == keys.frames("g1", SPOT) == "binance:frames:g1"  # as before markets
    assert [keys.frames("g1", market) for market in (USDM, COINM)] == [
        "binance:frames:usdm:g1",
        "binance:frames:coinm:g1",
    ]
    assert {market: keys.frames_market(keys.frames("g1", market)) for market in MARKETS} == {m: m for m in MARKETS}
    assert RedisKeys("a:usdm").frames_market("a:usdm:frames:g1") == SPOT
    with pytest.raises(ValueError, match="unknown market 'options': use one of spot, usdm, coinm"):
        keys.frames("g1", "options")


def test_markets_name_their_tables() -> None:
    assert set(MARKETS[SPOT].tables) == set(TABLES) - set(FUTURES_TABLES)  # spot's, as before markets
    assert set(FUTURES_TABLES) == {table for market in FUTURES_MARKETS for table in market.tables}
    assert market_named(USDM).table("aggTrade") == "usdm_agg_trades"
    assert market_named(COINM).table("indexPriceKline") == "coinm_index_price_klines"
    with pytest.raises(ValueError, match="the usdm market has no 'indexPrice' stream"):
        market_named(USDM).table("indexPrice")
    assert [market_of_st(1), market_of_st(2)] == [USDM, COINM]
    with pytest.raises(ValueError):
        market_of_st(True)


@pytest.mark.parametrize(
    ("stream", "kind"),
    [
        ("btcusdt_perpetual@continuousKline_1m", "continuousKline"),
        ("btcusd_200626@markPriceKline_1h", "markPriceKline"),
        ("btcusd@indexPriceKline_1d", "indexPriceKline"),
        ("!markPrice@arr@1s", "markPrice"),
        ("btcusd@indexPrice@1s", "indexPrice"),
        ("!forceOrder@arr", "forceOrder"),
        ("btcusdt@depth5@500ms", "depth5"),
        ("btcusdt@ticker_1h", "ticker_1h"),
    ],
)
def test_stream_kind_of_futures_streams(stream: str, kind: str) -> None:
    assert stream_kind(stream) == kind


@pytest.mark.parametrize(
    ("market", "kinds", "streams"),
    [
        (USDM, ["continuousKline_1m"], ["btcusdt_perpetual@continuousKline_1m"]),
        (USDM, ["continuouskline_current_quarter_1h"], ["btcusdt_current_quarter@continuousKline_1h"]),
        (USDM, ["continuousKline_next_quarter_1d"], ["btcusdt_next_quarter@continuousKline_1d"]),
        (COINM, ["indexPrice", "indexPriceKline_1m"], ["btcusdt@indexPrice", "btcusdt@indexPriceKline_1m"]),
        (COINM, ["indexPrice@1s"], ["btcusdt@indexPrice@1s"]),
    ],
)
def test_pair_kinds_are_named_by_the_pair_and_their_streams_by_binance(
    market: str, kinds: list[str], streams: list[str]
) -> None:
    names = stream_names(["BTCUSDT"], normalize_stream_kinds(kinds, market))
    assert names == streams
    group = Group("g", tuple(names), market)
    assert group.symbols == ["BTCUSDT"]  # unsubscribe takes the pair the subscribe took
    assert group.path == ("/market/stream" if market == USDM else "/stream")
    assert [stream_subject(name) for name in names] == ["BTCUSDT"] * len(names)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("continuousKline_quarterly_1m", "unknown contract type 'quarterly'"),
        ("continuousKline_1s", "unknown kline interval '1s'"),
        ("indexPrice", "unknown stream kind 'indexPrice'"),  # COIN-M's only
    ],
)
def test_bad_pair_kinds_say_what_to_use(kind: str, message: str) -> None:
    with pytest.raises(InvalidSubscription, match=message):
        normalize_stream_kinds([kind], USDM)


def test_futures_tables_are_partitioned_only_on_binances_own_time() -> None:
    futures_partitioned = [t for t in PARTITIONED_TABLES if t in FUTURES_TABLES]
    assert "usdm_book_tickers" in futures_partitioned and "usdm_liquidations" not in futures_partitioned
    assert all(TIME_COLUMNS[t] != "received_at" for t in futures_partitioned)


def test_a_contract_info_event_stops_a_subscribed_contract_when_it_is_stored(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    registry = GroupRegistry(redis_client, keys)
    streams = ("btcusdt_261225@aggTrade", "btcusdt@aggTrade", "!contractInfo")
    registry.want(Group("g1", streams, USDM))
    ListingWatch(redis_client, keys).note(USDM, {"BTCUSDT_261225": "TRADING", "BTCUSDT": "TRADING"})
    event = {"e": "contractInfo", "s": "BTCUSDT_261225", "ps": "BTCUSDT", "ct": "CURRENT_QUARTER", "dt": 9, "ot": 1}
    # Out of time order: the latest status counts.
    frames = [
        orjson.dumps({"stream": "!contractInfo", "data": {**event, "E": at, "cs": status}})
        for at, status in ((6, "DELIVERING"), (5, "TRADING"))
    ]
    push(redis_client, keys, [(USDM, frame) for frame in frames])
    drain(redis_client, keys, engine)

    assert registry.wanted()["g1"].streams == ("btcusdt@aggTrade", "!contractInfo")
    with engine.connect() as conn:
        changes = [tuple(row) for row in conn.execute(select(listing_changes.c.symbol, listing_changes.c.new_status))]
    assert changes == [("BTCUSDT_261225", "DELIVERING")]
