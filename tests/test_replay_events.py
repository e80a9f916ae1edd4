"""The replay iterator over a database filled through the real drain path: frames
pushed to a real Redis list behind their clock marks, drained by the Drainer into a
SQLite file (and a PostgreSQL database), then walked back in the order received."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from sqlalchemy.engine import Engine

from worker.buffer import FrameBuffer, clock_mark
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.replay import events
from worker.store.drain import Drainer
from worker.store.storage import store_rows

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the first flush's clock mark


def trade(symbol: str, trade_id: int, at: int) -> dict[str, Any]:
    return {
        "e": "trade", "E": at, "s": symbol, "t": trade_id, "p": "30000.01000000",
        "q": "0.00100000", "T": at, "m": trade_id % 2 == 0,
    }  # fmt: skip


def depth_update(symbol: str, update_id: int, at: int) -> dict[str, Any]:
    return {
        "e": "depthUpdate", "E": at, "s": symbol, "U": update_id, "u": update_id + 2,
        "b": [["29999.99000000", "1.50000000"]], "a": [["30000.02000000", "0.00000000"]],
    }  # fmt: skip


def kline(symbol: str, interval: str, open_ms: int, at: int) -> dict[str, Any]:
    ohlc = {name: "30000.01000000" for name in "ohlc"}
    volumes = {name: "1.25000000" for name in "vqVQ"}
    k = {"t": open_ms, "T": open_ms + 59_999, "s": symbol, "i": interval, "f": 1, "L": 9, "n": 9, "x": False}
    return {"e": "kline", "E": at, "s": symbol, "k": {**k, **ohlc, **volumes}}


def window_ticker(symbol: str, at: int) -> dict[str, Any]:
    prices = {name: "2000.50000000" for name in "pohlcwvq"}
    return {"e": "1hTicker", "E": at, "s": symbol, **prices, "P": "-1.250", "O": at - 3_600_000, "C": at,
            "F": 1, "L": 9, "n": 9}  # fmt: skip


def book_ticker(symbol: str, update_id: int) -> dict[str, Any]:
    return {"u": update_id, "s": symbol, "b": "29999.99000000", "B": "1.00000000",
            "a": "30000.02000000", "A": "2.00000000"}  # fmt: skip


def partial_depth(update_id: int) -> dict[str, Any]:
    return {"lastUpdateId": update_id, "bids": [["2000.10000000", "3.00000000"]], "asks": []}


Flush = tuple[int, list[tuple[str, dict[str, Any]]]]
"""A clock mark and the (stream, payload) frames it dates, in the order received."""


def record(
    client: redis.Redis, keys: RedisKeys, engine: Engine, lists: dict[str, list[Flush]], batch_size: int = 500
) -> None:
    """Each group's flushes pushed to its Redis list, then drained into `engine`."""
    registry, buffer = GroupRegistry(client, keys), FrameBuffer(client, keys)
    for group, flushes in lists.items():
        registry.want(Group(id=group, streams=("btcusdt@trade",)))
        key = buffer.register(group)
        for mark, frames in flushes:
            encoded = [orjson.dumps({"stream": stream, "data": payload}) for stream, payload in frames]
            client.rpush(key, clock_mark(mark), *encoded)
    report = Drainer(client, keys, engine, batch_size=batch_size).drain(time_budget=60)
    assert report.dead_letters == 0


# Two connections flushing in turn; each flush's frames in the order received (a
# bookTicker, which carries no event time, among the others).
G1: list[Flush] = [
    (T0, [
        ("btcusdt@trade", trade("BTCUSDT", 1, T0 - 30)),
        ("btcusdt@bookTicker", book_ticker("BTCUSDT", 7)),
        ("btcusdt@depth@100ms", depth_update("BTCUSDT", 100, T0 - 20)),
        ("btcusdt@trade", trade("BTCUSDT", 2, T0 - 10)),
    ]),
    (T0 + 100, [
        ("btcusdt@kline_1m", kline("BTCUSDT", "1m", T0, T0 + 60)),
        ("btcusdt@kline_5m", kline("BTCUSDT", "5m", T0, T0 + 60)),
        ("btcusdt@trade", trade("BTCUSDT", 3, T0 + 70)),
    ]),
    (T0 + 200, [("btcusdt@depth@100ms", depth_update("BTCUSDT", 103, T0 + 180))]),
]  # fmt: skip
G2: list[Flush] = [
    (T0 + 50, [
        ("ethusdt@trade", trade("ETHUSDT", 500, T0 + 20)),
        ("ethusdt@ticker_1h", window_ticker("ETHUSDT", T0 + 40)),
        ("ethusdt@depth5@100ms", partial_depth(900)),
    ]),
    (T0 + 100, [("ethusdt@trade", trade("ETHUSDT", 501, T0 + 65))]),  # between two of G1's
    (T0 + 150, [("ethusdt@depth5@100ms", partial_depth(901))]),
]  # fmt: skip


def received(*flushes: Flush) -> list[tuple[int, str, dict[str, Any]]]:
    return [(mark, stream, payload) for mark, frames in flushes for stream, payload in frames]


@pytest.fixture
def recorded(redis_client: redis.Redis, keys: RedisKeys, engine: Engine) -> Engine:
    record(redis_client, keys, engine, {"g1": G1, "g2": G2})
    return engine


def test_every_frame_comes_back_as_sent_in_the_order_received(recorded: Engine) -> None:
    # The flushes at T0 + 100 of both connections share their receive time: each keeps
    # its own order, and they interleave by place, then event time (the first places:
    # the 1m kline's E is T0 + 60, ETH's trade T0 + 65).
    both_at_100 = (T0 + 100, [G1[1][1][0], G2[1][1][0], G1[1][1][1], G1[1][1][2]])
    expected = received(G1[0], G2[0], both_at_100, G2[2], G1[2])

    assert list(events(recorded, T0, T0 + 1000)) == expected


def test_the_window_takes_its_start_and_leaves_its_end(recorded: Engine) -> None:
    window = list(events(recorded, T0 + 50, T0 + 150))

    assert {at for at, _, _ in window} == {T0 + 50, T0 + 100}


def test_symbols_and_streams_narrow_the_selection(recorded: Engine) -> None:
    eth = list(events(recorded, T0, T0 + 1000, symbols=["ethusdt"]))
    assert eth == received(G2[0], G2[1], G2[2])

    klines = list(events(recorded, T0, T0 + 1000, streams=["KLINE_1m"]))
    assert klines == [(T0 + 100, "btcusdt@kline_1m", G1[1][1][0][1])]

    trades_and_books = events(recorded, T0, T0 + 1000, symbols=["BTCUSDT"], streams=["trade", "bookTicker"])
    assert [(stream, payload.get("t", payload.get("u"))) for _, stream, payload in trades_and_books] == [
        ("btcusdt@trade", 1), ("btcusdt@bookTicker", 7), ("btcusdt@trade", 2), ("btcusdt@trade", 3),
    ]  # fmt: skip


def test_a_depth_kind_is_named_as_asked_for_the_rows_do_not_say_its_speed(recorded: Engine) -> None:
    def names(*streams: str) -> set[str]:
        return {stream for _, stream, _ in events(recorded, T0, T0 + 1000, streams=streams)}

    assert names("depth5") == {"ethusdt@depth5"}
    assert names("depth5@100ms", "depth") == {"ethusdt@depth5@100ms", "btcusdt@depth"}
    assert {stream for _, stream, _ in events(recorded, T0, T0 + 1000) if "depth" in stream} == {
        "btcusdt@depth@100ms", "ethusdt@depth5@100ms",
    }  # fmt: skip


def test_rows_from_rest_have_no_receive_time_and_are_not_events(recorded: Engine) -> None:
    with recorded.begin() as conn:  # a backfilled trade inside the window's times
        store_rows(conn, {"trades": [("BTCUSDT", 4, 30000.01, 0.001, T0 + 90, False, None, None, None)]})

    trade_ids = [payload["t"] for _, stream, payload in events(recorded, T0, T0 + 1000, streams=["trade"])]

    assert sorted(trade_ids) == [1, 2, 3, 500, 501]


def test_kinds_interleaved_in_one_flush_come_back_in_the_order_received(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine
) -> None:
    """Two kinds (and a third without event time) alternating within one flush, their
    event times against their receive order, stored by several drain batches (a batch
    of 4 elements cuts the flush twice): they come back as received."""
    flush = (T0, [
        ("btcusdt@depth@100ms", depth_update("BTCUSDT", 100, T0 - 5)),
        ("btcusdt@trade", trade("BTCUSDT", 11, T0 - 9)),
        ("btcusdt@bookTicker", book_ticker("BTCUSDT", 102)),
        ("btcusdt@depth@100ms", depth_update("BTCUSDT", 103, T0 - 7)),
        ("btcusdt@trade", trade("BTCUSDT", 12, T0 - 30)),
        ("ethusdt@trade", trade("ETHUSDT", 7, T0 - 40)),
        ("btcusdt@bookTicker", book_ticker("BTCUSDT", 105)),
    ])  # fmt: skip
    record(redis_client, keys, engine, {"g1": [flush]}, batch_size=4)

    assert list(events(engine, T0, T0 + 1)) == received(flush)


def test_rows_stored_without_their_place_come_by_event_time_then_by_id(engine: Engine) -> None:
    """Rows stored before `received_seq` existed (NULL): event time, then key decide."""
    with engine.begin() as conn:
        store_rows(
            conn,
            {
                "trades": [
                    ("BTCUSDT", 12, 30000.01, 0.001, T0 - 5, False, T0 - 5, T0, None),
                    ("BTCUSDT", 11, 30000.01, 0.001, T0 - 5, False, T0 - 5, T0, None),
                ],
                "depth_updates": [("BTCUSDT", 102, 100, T0 - 9, b"", b"", T0, None)],
            },
        )

    order = [(stream, payload.get("t", payload.get("u"))) for _, stream, payload in events(engine, T0, T0 + 1)]

    assert order == [("btcusdt@depth@100ms", 102), ("btcusdt@trade", 11), ("btcusdt@trade", 12)]


@pytest.mark.parametrize(
    ("start", "end", "symbols", "streams", "message"),
    [
        (T0 + 10, T0 + 10, None, None, "the start 2026-01-01T00:00:00.010Z is not before the end"),
        (T0, T0 + 1000, ["XRPUSDT"], None, "no recorded XRPUSDT rows were received between"),
        (T0 + 150, T0 + 1000, ["ETHUSDT"], ["trade"], "no recorded ETHUSDT rows were received between"),
        (T0, T0 + 1000, None, ["trades"], "unknown stream kind 'trades': use one of trade, aggTrade"),
        (T0, T0 + 1000, None, ["!miniTicker@arr"], "!miniTicker@arr is replayed per symbol: ask for miniTicker"),
        (T0, T0 + 1000, None, ["depth", "depth@100ms"], "depth and depth@100ms are the same recorded rows"),
    ],
)
def test_bad_input_is_refused_at_the_call_in_one_line(
    recorded: Engine, start: int, end: int, symbols: list[str] | None, streams: list[str] | None, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as error:
        events(recorded, start, end, symbols=symbols, streams=streams)  # no next(): refused at once
    assert "\n" not in str(error.value)


def test_memory_stays_flat_however_long_the_window(redis_client: redis.Redis, keys: RedisKeys, engine: Engine) -> None:
    """40,000 trades in 400 flushes: walking all of them takes no more memory than
    walking a quarter (0.3 to 0.8 MB measured), so nothing holds the window (with each
    table's rows read by fetchall instead: 4 to 5 MB for the quarter, 16 to 21 MB)."""
    flushes = [(T0 + 10 * n, [("btcusdt@trade", trade("BTCUSDT", 100 * n + i, T0 + 10 * n)) for i in range(100)])
               for n in range(400)]  # fmt: skip
    record(redis_client, keys, engine, {"g1": flushes})

    quarter_count, quarter_peak = walk(events(engine, T0, T0 + 1000))
    whole_count, whole_peak = walk(events(engine, T0, T0 + 4000))

    assert (quarter_count, whole_count) == (10_000, 40_000)
    assert whole_peak < 1.5 * quarter_peak, (quarter_peak, whole_peak)


def walk(iterator: Iterator[Any]) -> tuple[int, int]:
    """(events, peak bytes Python allocated while walking them)."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in iterator)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
