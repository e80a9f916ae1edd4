"""Frames to rows, checked against Binance's own documentation examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.test_books import BOOK_AND_2026_EXAMPLES
from worker.store.parsing import ParsedBatch, parse_frames
from worker.store.storage import RECEIVED_COLUMNS, TABLE_COLUMNS, create_schema, make_engine, store_rows
from worker.streams import KLINE_INTERVALS, MARKETS, SUPPORTED_KINDS, stream_kind, validate_stream_kind

EXAMPLES: dict[str, Any] = json.loads((Path(__file__).parent / "fixtures" / "binance-doc-examples.json").read_text())

E = 1672515782136  # the event time of most examples

R = 1672515782200  # the clock mark of the flush the examples arrive in
# example name -> (combined stream name it arrives on, table, the rows it must give,
# without the receive time: the flush's clock mark, appended to every row)
SUPPORTED = {
    "trade": ("bnbbtc@trade", "trades", [("BNBBTC", 12345, 0.001, 100.0, E, True, E)]),
    "aggTrade": (
        "bnbbtc@aggTrade",
        "agg_trades",
        [("BNBBTC", 12345, 0.001, 100.0, 100, 105, E, True, E)],
    ),
    "kline": (
        "bnbbtc@kline_1m",
        "klines",
        [
            (
                "BNBBTC",
                "1m",
                1672515780000,
                1672515839999,
                0.001,
                0.0025,
                0.0015,
                0.002,
                1000.0,
                1.0,
                100,
                500.0,
                0.5,
                100,
                200,
                False,
                E,
            )
        ],
    ),  # fmt: skip
    "kline_utc8": (
        "bnbbtc@kline_1m@+08:00",
        "klines",
        [
            (
                "BNBBTC",
                "1m",
                1672515780000,
                1672515839999,
                0.001,
                0.0025,
                0.0015,
                0.002,
                1000.0,
                1.0,
                100,
                500.0,
                0.5,
                100,
                200,
                False,
                E,
            )
        ],
    ),  # fmt: skip
    "miniTicker": (
        "bnbbtc@miniTicker",
        "mini_tickers",
        [("BNBBTC", E, 0.0025, 0.001, 0.0025, 0.001, 10000.0, 18.0)],
    ),
    "ticker": (
        "bnbbtc@ticker",
        "tickers",
        [
            (
                "BNBBTC",
                E,
                0.0015,
                250.0,
                0.0018,
                0.0009,
                0.0025,
                10.0,
                0.0024,
                10.0,
                0.0026,
                100.0,
                0.001,
                0.0025,
                0.001,
                10000.0,
                18.0,
                0,
                86400000,
                0,
                18150,
                18151,
            )
        ],
    ),  # fmt: skip
    "bookTicker": (
        "bnbusdt@bookTicker",
        "book_tickers",
        [("BNBUSDT", 400900217, 25.3519, 31.21, 25.3652, 40.66)],
    ),
    "avgPrice": (
        "btcusdt@avgPrice",
        "avg_prices",
        [("BTCUSDT", 1693907033000, "5m", 25776.86, 1693907032213)],
    ),
    "miniTicker_arr": (
        "!miniTicker@arr",
        "mini_tickers",
        [("BNBBTC", E, 0.0025, 0.001, 0.0025, 0.001, 10000.0, 18.0)],
    ),
}

# Protocol messages a connection receives besides data: counted, neither stored nor errors.
CONTROL = [
    "serverShutdown",
    "combined_wrapper_example",
    "subscribe_response",
    "unsubscribe_response",
    "list_subscriptions_response",
    "set_property_response",
    "get_property_response",
]

# Not stream frames, so not parse_frames' input: the requests are what we send, and the
# REST rows, snapshots and errors come from HTTP responses (the backfill parses those).
NOT_STREAM_FRAMES = [
    "subscribe_request",
    "unsubscribe_request",
    "list_subscriptions_request",
    "set_property_request",
    "get_property_request",
    "klines_rest_row",
    "aggTrades_rest_row",
    "trades_rest_row",
    "historicalTrades_rest_row",
    "depth_rest_snapshot",
    "ping_rest_response",
    "time_rest_response",
    "exchangeInfo_symbol_example",
    "error_example",
]


def frame(payload: Any, stream: str | None = None) -> bytes:
    """A frame as Binance sends it: bare (raw stream) or in a combined-stream envelope."""
    return orjson.dumps(payload if stream is None else {"stream": stream, "data": payload})


def stored_rows(batch: ParsedBatch) -> dict[str, list[tuple]]:
    return {table: rows for table, rows in batch.rows.items() if rows}


def test_every_documentation_example_is_classified() -> None:
    groups = [SUPPORTED, BOOK_AND_2026_EXAMPLES, CONTROL, NOT_STREAM_FRAMES]
    classified = [name for group in groups for name in group]
    assert sorted(classified) == sorted(EXAMPLES)


@pytest.mark.parametrize("combined", [False, True], ids=["bare", "combined"])
@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_example_gives_its_rows(name: str, combined: bool) -> None:
    stream, table, rows = SUPPORTED[name]
    batch = parse_frames([f"@{R}".encode(), frame(EXAMPLES[name], stream if combined else None)])
    assert stored_rows(batch) == {table: [(*row, R, 0) for row in rows]}  # the flush's first frame: place 0
    assert (batch.frames, batch.control, batch.dead_letters) == (1, 0, [])


@pytest.mark.parametrize("name", SUPPORTED)
def test_rows_have_the_columns_of_their_table(name: str) -> None:
    _, table, rows = SUPPORTED[name]
    assert all(len(row) + RECEIVED_COLUMNS == len(TABLE_COLUMNS[table]) for row in rows)


def test_parsed_examples_fit_the_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fit.db'}")
    create_schema(engine)
    batch = parse_frames([b"@1700000000000"] + [frame(EXAMPLES[name]) for name in SUPPORTED])
    with engine.begin() as conn:
        written = store_rows(conn, batch.rows)
    assert batch.dead_letters == []
    # kline_utc8 replaces the open kline of the same key; the @arr miniTicker is a replay.
    assert {table: count for table, count in written.items() if count} == {
        "trades": 1, "agg_trades": 1, "klines": 2, "tickers": 1,
        "mini_tickers": 1, "book_tickers": 1, "avg_prices": 1,
    }  # fmt: skip


@pytest.mark.parametrize("name", CONTROL)
def test_control_example_is_counted_not_stored(name: str) -> None:
    batch = parse_frames([frame(EXAMPLES[name])])
    assert (batch.frames, batch.control, batch.dead_letters) == (1, 1, [])
    assert stored_rows(batch) == {}


def test_server_shutdown_on_its_combined_stream_is_control() -> None:
    batch = parse_frames([frame(EXAMPLES["serverShutdown"], "!serverShutdown")])
    assert (batch.control, batch.dead_letters) == (1, [])


GOOD = EXAMPLES["trade"]

MALFORMED = {
    "not JSON": (b"hello", "invalid JSON: "),
    "truncated JSON": (frame(GOOD, "bnbbtc@trade")[:40], "invalid JSON: "),
    "empty element": (b"", "invalid JSON: "),
    "missing field": (
        frame({k: v for k, v in GOOD.items() if k != "p"}, "bnbbtc@trade"),
        "trade frame lacks field 'p'",
    ),
    "id of the wrong type": (
        frame({**GOOD, "t": "abc"}, "bnbbtc@trade"),
        "trade frame has field 't' = 'abc', expected an integer",
    ),
    "price that is no number": (
        frame({**GOOD, "p": "cheap"}, "bnbbtc@trade"),
        "trade frame has field 'p' = 'cheap', expected a decimal string",
    ),
    "flag of the wrong type": (
        frame({**GOOD, "m": 1}, "bnbbtc@trade"),
        "trade frame has field 'm' = 1, expected true or false",
    ),
    "kline without its k object": (
        frame({**EXAMPLES["kline"], "k": [1, 2]}, "bnbbtc@kline_1m"),
        "kline frame has field 'k' = [1, 2], expected an object",
    ),
    "payload that is no object": (frame("hello", "bnbbtc@trade"), "trade payload is not"),
    "envelope without data": (
        orjson.dumps({"stream": "bnbbtc@trade"}),
        "combined frame of stream 'bnbbtc@trade' lacks data",
    ),
    "stream name that is no string": (
        orjson.dumps({"stream": 7, "data": GOOD}),
        "combined frame has a non-string stream name 7",
    ),
    "unknown stream": (frame(GOOD, "bnbbtc@trades"), "unsupported stream kind 'trades'"),
    "JSON that is no object": (b"42", "unexpected JSON int"),
    "array item that is no object": (
        frame([EXAMPLES["miniTicker"], "x"], "!miniTicker@arr"),
        "miniTicker payload is not a JSON object",
    ),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_frame_is_dead_lettered_and_its_neighbours_parse(name: str) -> None:
    bad, reason = MALFORMED[name]
    first, last = {**GOOD, "t": 1}, {**GOOD, "t": 2}
    batch = parse_frames([frame(first, "bnbbtc@trade"), bad, frame(last, "bnbbtc@trade")])
    assert [row[1] for row in batch.rows["trades"]] == [1, 2]
    assert len(batch.dead_letters) == 1
    assert batch.dead_letters[0].frame == bad
    assert batch.dead_letters[0].reason.startswith(reason)
    assert batch.frames == 3


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"u": "7"}, "bookTicker frame has field 'u' = '7', expected an integer"),
        ({"b": "cheap"}, "bookTicker frame has field 'b' = 'cheap', expected a decimal string"),
        ({"s": None}, "bookTicker frame has field 's' = None, expected a string"),
        ({"A": None}, "bookTicker frame has field 'A' = None, expected a decimal string"),
    ],
)
def test_a_book_ticker_is_checked_as_every_kind(change: dict[str, Any], reason: str) -> None:
    """bookTicker has a fast builder: a bad field still gets the checked builder's reason."""
    batch = parse_frames([frame({**EXAMPLES["bookTicker"], **change}, "bnbusdt@bookTicker")])
    assert [d.reason for d in batch.dead_letters] == [reason]


def test_a_price_sent_as_a_number_gives_the_same_book_ticker_row() -> None:
    book = EXAMPLES["bookTicker"]
    as_text, as_numbers = (
        parse_frames([frame(payload, "bnbusdt@bookTicker")]).rows["book_tickers"]
        for payload in (book, {**book, "b": float(book["b"]), "A": float(book["A"])})
    )
    assert as_text == as_numbers and len(as_text) == 1


def test_a_stream_routed_by_an_earlier_batch_is_parsed_and_checked_alike() -> None:
    """The parser keeps the routes of the streams it saw across batches."""
    book = EXAMPLES["bookTicker"]
    first = parse_frames([frame(book, "xrpusdt@bookTicker")])
    again = parse_frames(
        [
            frame(book, "xrpusdt@bookTicker"),
            orjson.dumps({"stream": "xrpusdt@bookTicker"}),
            frame("hello", "xrpusdt@bookTicker"),
        ]
    )
    assert again.rows["book_tickers"] == first.rows["book_tickers"] and len(first.rows["book_tickers"]) == 1
    assert [d.reason for d in again.dead_letters] == [
        "combined frame of stream 'xrpusdt@bookTicker' lacks data",
        "bookTicker payload is not a JSON object",
    ]


def test_one_bad_item_drops_its_whole_array_frame_only() -> None:
    good_array = frame([EXAMPLES["miniTicker"], {**EXAMPLES["miniTicker"], "s": "ETHBTC"}])
    batch = parse_frames([good_array, MALFORMED["array item that is no object"][0]])
    assert [row[0] for row in batch.rows["mini_tickers"]] == ["BNBBTC", "ETHBTC"]
    assert len(batch.dead_letters) == 1


def test_clock_marks_date_every_row_that_follows() -> None:
    book = EXAMPLES["bookTicker"]
    batch = parse_frames(
        [
            frame({**book, "u": 1}, "bnbusdt@bookTicker"),
            b"@1700000000123",
            frame({**book, "u": 2}, "bnbusdt@bookTicker"),
            frame({**book, "u": 3}),
            frame(EXAMPLES["trade"], "bnbbtc@trade"),
            b"@1700000000456",
            frame({**book, "u": 4}, "bnbusdt@bookTicker"),
            frame(EXAMPLES["kline"], "bnbbtc@kline_1m"),
        ]
    )
    received = [(row[1], row[-2]) for row in batch.rows["book_tickers"]]
    assert received == [(1, None), (2, 1700000000123), (3, 1700000000123), (4, 1700000000456)]
    assert [row[-2] for row in batch.rows["trades"] + batch.rows["klines"]] == [1700000000123, 1700000000456]
    assert batch.last_mark == 1700000000456  # what the rest of a cut flush is dated by
    assert (batch.frames, batch.dead_letters) == (6, [])


def test_every_frame_keeps_its_place_in_its_flush_also_after_a_mark_put_back() -> None:
    """`received_seq` counts every frame after its mark, whatever its kind or fate (a
    dead letter too); a mark put back before the rest of a cut flush names the place
    the count goes on from, and the batch tells the place of the frame after it."""
    book, trade = EXAMPLES["bookTicker"], EXAMPLES["trade"]
    batch = parse_frames(
        [
            b"@1700000000123",
            frame({**book, "u": 1}, "bnbusdt@bookTicker"),
            frame({**trade, "t": 1}, "bnbbtc@trade"),
            b"not json",
            frame({**book, "u": 2}, "bnbusdt@bookTicker"),
            b"@1700000000456:7",  # the rest of a flush whose first 7 frames an earlier batch stored
            frame({**trade, "t": 2}, "bnbbtc@trade"),
            frame({**book, "u": 3}, "bnbusdt@bookTicker"),
        ]
    )
    places = sorted((row[-2], row[-1], table) for table in ("book_tickers", "trades") for row in batch.rows[table])
    assert places == [
        (1700000000123, 0, "book_tickers"),
        (1700000000123, 1, "trades"),
        (1700000000123, 3, "book_tickers"),
        (1700000000456, 7, "trades"),
        (1700000000456, 8, "book_tickers"),
    ]
    assert (batch.last_mark, batch.next_seq) == (1700000000456, 9)


def test_garbled_clock_mark_is_dead_lettered_and_the_time_becomes_unknown() -> None:
    book = frame(EXAMPLES["bookTicker"], "bnbusdt@bookTicker")
    batch = parse_frames([b"@1700000000123", b"@soon", book])
    assert batch.rows["book_tickers"][0][-2] is None
    assert [d.reason for d in batch.dead_letters] == ["invalid clock mark: expected @<ms> or @<ms>:<place>"]
    assert batch.frames == 1


@pytest.mark.parametrize("market", MARKETS)
def test_every_table_of_the_market_is_in_the_batch_even_without_rows(market: str) -> None:
    batch = parse_frames([], market)
    rest = {MARKETS[market].table_prefix + table for table in MARKETS[market].rest_tables}  # REST fills those
    assert set(batch.rows) == set(MARKETS[market].tables) - rest
    assert (batch.frames, batch.control, batch.dead_letters) == (0, 0, [])


@pytest.mark.parametrize(
    ("stream", "kind"),
    [
        ("btcusdt@trade", "trade"),
        ("btcusdt@aggTrade", "aggTrade"),
        ("btcusdt@kline_1m", "kline"),
        ("btcusdt@kline_1M@+08:00", "kline"),
        ("btcusdt@ticker", "ticker"),
        ("btcusdt@ticker_4h", "ticker_4h"),
        ("btcusdt@miniTicker", "miniTicker"),
        ("!miniTicker@arr", "miniTicker"),
        ("btcusdt@bookTicker", "bookTicker"),
        ("btcusdt@avgPrice", "avgPrice"),
        ("btcusdt@depth20@100ms", "depth20"),
        ("!serverShutdown", "serverShutdown"),
    ],
)
def test_stream_kind(stream: str, kind: str) -> None:
    assert stream_kind(stream) == kind


@pytest.mark.parametrize(
    ("asked", "canonical"),
    [
        ("trade", "trade"),
        ("aggtrade", "aggTrade"),
        ("AGGTRADE", "aggTrade"),
        ("Ticker", "ticker"),
        ("miniticker", "miniTicker"),
        ("bookticker", "bookTicker"),
        ("avgprice", "avgPrice"),
        ("kline_1m", "kline_1m"),
        ("KLINE_1m", "kline_1m"),
        ("kline_1M", "kline_1M"),  # a month, not a minute
        ("kline_1s", "kline_1s"),
    ],
)
def test_validate_stream_kind_gives_the_canonical_spelling(asked: str, canonical: str) -> None:
    assert validate_stream_kind(asked) == canonical


def test_every_supported_kind_and_interval_validates() -> None:
    for kind in SUPPORTED_KINDS:
        if kind != "kline":
            assert validate_stream_kind(kind) == kind
    for interval in KLINE_INTERVALS:
        assert validate_stream_kind(f"kline_{interval}") == f"kline_{interval}"


def test_unknown_stream_kind_error_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as error:
        validate_stream_kind("trades")
    assert str(error.value) == (
        "unknown stream kind 'trades': use one of trade, aggTrade, kline_<interval> "
        "(1s, 1m, 3m, 5m, 15m, 30m, 1h, 2h, 4h, 6h, 8h, 12h, 1d, 3d, 1w, 1M), "
        "ticker, miniTicker, bookTicker, avgPrice, depth, depth5, depth10, depth20, ticker_1h, ticker_4h, "
        "ticker_1d, blockTrade, referencePrice (depth kinds also as <kind>@100ms), or all-market "
        "!miniTicker@arr, !ticker_1h@arr, !ticker_4h@arr, !ticker_1d@arr"
    )


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        ("depth@1000ms", "unknown stream kind 'depth@1000ms': only depth, depth5, depth10, depth20 take a speed"),
        ("trade@100ms", "unknown stream kind 'trade@100ms'"),
        ("ticker_2h", "unknown stream kind 'ticker_2h'"),
        ("kline", "unknown stream kind 'kline'"),
        ("kline_1H", "unknown kline interval '1H' in 'kline_1H': use one of 1s, 1m,"),
        ("kline_2m", "unknown kline interval '2m'"),
    ],
)
def test_unknown_stream_kinds_are_refused(asked: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        validate_stream_kind(asked)
