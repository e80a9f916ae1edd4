"""Rows back to Binance's frames: a rebuilt frame parses into the row it came from.

For every stream kind, on Binance's documented examples (values equal, decimal strings
may differ in trailing zeros) and on the frames of the real fake exchange over a real
socket (the same strings: it writes Binance's 8 decimals, as the rebuild does, except
for the digits past the 15th significant one of a large volume, which no float keeps).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest

from tests.test_books import BOOK_AND_2026_EXAMPLES, EXAMPLES
from tests.test_fake_exchange import Fake, connect, running_fake
from tests.test_parsing import SUPPORTED
from worker.replay import frames
from worker.store.parsing import FIELDS, FieldType, Row, parse_frames
from worker.streams import KIND_TABLES, SUPPORTED_KINDS

DOCUMENTED = {name: stream for name, (stream, _, _) in {**SUPPORTED, **BOOK_AND_2026_EXAMPLES}.items()}
"""Documented example -> the stream it arrives on."""

UNSTORED = {"trades": {"M"}, "agg_trades": {"M"}, "klines": {"k.B"}}
"""Fields Binance sends that no column keeps ("ignore" fields): absent from rebuilt frames."""

MARK = 1_700_000_000_000


def rows_of(stream: str, payload: Any) -> list[tuple[str, Row]]:
    """(table, row) of every row a frame gives, through the drain's parser."""
    batch = parse_frames([b"@%d" % MARK, orjson.dumps({"stream": stream, "data": payload})])
    assert batch.dead_letters == []
    return [(table, row) for table, rows in batch.rows.items() for row in rows]


def flat(payload: dict[str, Any]) -> dict[str, Any]:
    """{"k": {"o": ..}} -> {"k.o": ..}: a kline's fields beside the others."""
    out: dict[str, Any] = {}
    for name, value in payload.items():
        if isinstance(value, dict):
            out.update({f"{name}.{inner}": v for inner, v in value.items()})
        else:
            out[name] = value
    return out


def as_numbers(value: Any) -> Any:
    """Decimal strings (alone or in levels) as Decimals, to compare values, not spellings."""
    if isinstance(value, list):
        return [as_numbers(item) for item in value]
    if isinstance(value, str):
        try:
            return Decimal(value)
        except ArithmeticError:
            return value
    return value


def round_trip(stream: str, original: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(original, rebuilt) for each row of a frame; asserts rebuilt -> row is the row."""
    pairs = []
    items = original if isinstance(original, list) else [original]
    for (table, row), item in zip(rows_of(stream, original), items, strict=True):
        rebuilt_stream = frames.stream_name(table, row, fast_depth=stream.endswith("@100ms"))
        rebuilt = frames.payload(table, row)
        assert rows_of(rebuilt_stream, rebuilt) == [(table, row)], stream
        assert orjson.loads(orjson.dumps(rebuilt)) == rebuilt  # plain JSON, nothing a client cannot read
        assert set(flat(item)) - set(flat(rebuilt)) == UNSTORED.get(table, set()), stream
        assert set(flat(rebuilt)) <= set(flat(item)), stream
        pairs.append((item, rebuilt))
    return pairs


@pytest.mark.parametrize("name", DOCUMENTED)
def test_a_documented_example_comes_back_with_every_stored_field(name: str) -> None:
    for original, rebuilt in round_trip(DOCUMENTED[name], EXAMPLES[name]):
        expected = {field: as_numbers(value) for field, value in flat(original).items() if field in flat(rebuilt)}
        assert {field: as_numbers(value) for field, value in flat(rebuilt).items()} == expected


def test_the_documented_examples_cover_every_table_a_stream_fills() -> None:
    tables = {table for name, stream in DOCUMENTED.items() for table, _ in rows_of(stream, EXAMPLES[name])}
    assert tables == set(KIND_TABLES.values())


@pytest.mark.parametrize(
    ("example", "stream", "named"),
    [
        ("trade", "bnbbtc@trade", "bnbbtc@trade"),
        ("kline", "bnbbtc@kline_1m", "bnbbtc@kline_1m"),
        ("kline_utc8", "bnbbtc@kline_1m@+08:00", "bnbbtc@kline_1m"),  # the time zone is not stored
        ("miniTicker_arr", "!miniTicker@arr", "bnbbtc@miniTicker"),  # per symbol
        ("diff_depth", "bnbbtc@depth@100ms", "bnbbtc@depth@100ms"),
        ("partial_depth", "bnbbtc@depth20", "bnbbtc@depth20@100ms"),  # the speed is not stored
        ("ticker_window", "bnbbtc@ticker_4h", "bnbbtc@ticker_4h"),
    ],
)
def test_a_row_is_named_by_its_symbol_and_kind(example: str, stream: str, named: str) -> None:
    payload = {**EXAMPLES[example], "e": "4hTicker"} if example == "ticker_window" else EXAMPLES[example]
    [(table, row)] = rows_of(stream, payload)
    assert frames.stream_name(table, row) == named
    assert frames.stream_name(table, row, fast_depth=False) == named.removesuffix("@100ms")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.001, "0.00100000"),
        (25776.86, "25776.86000000"),
        (100.0, "100.00000000"),
        (1e-9, "0.000000001"),  # below Binance's 8 places: the shortest exact form
        (12345.67890123, "12345.67890123"),
        (1e20, "100000000000000000000.00000000"),
        (100000000.1, "100000000.10000000"),  # not "100000000.09999999", the float's own 8 places
        (23343287190.60209274, "23343287190.60209300"),  # past 15 significant digits: lost
        (-0.5, "-0.50000000"),
        (1.5e-05, "0.00001500"),  # repr has an exponent both sides of the fast path's limits
        (1e-05, "0.00001000"),
        (1e16, "10000000000000000.00000000"),
        (-0.0, "-0.00000000"),
    ],
)
def test_a_decimal_reads_back_as_the_same_float(value: float, text: str) -> None:
    assert frames.decimal_string(value) == text
    assert float(text) == value


def test_every_field_type_is_written_back() -> None:
    used = {field.type for fields in FIELDS.values() for field in fields}
    assert used == set(FieldType)


def test_a_missing_reference_price_comes_back_as_null() -> None:
    [(table, row)] = rows_of("bazusd@referencePrice", {**EXAMPLES["referencePrice"], "r": None})
    assert frames.payload(table, row)["r"] is None


# Every kind the fake exchange serves, on one combined connection; blockTrade comes
# every 50th trade, so the fake trades 50 a second.
FAKE_STREAMS = [
    "btcusdt@trade", "btcusdt@aggTrade", "btcusdt@kline_1s", "btcusdt@kline_1m",
    "btcusdt@ticker", "btcusdt@miniTicker", "btcusdt@bookTicker", "btcusdt@avgPrice",
    "btcusdt@depth", "btcusdt@depth@100ms", "btcusdt@depth5", "btcusdt@depth10@100ms",
    "btcusdt@depth20@100ms", "btcusdt@ticker_1h", "btcusdt@ticker_4h", "btcusdt@ticker_1d",
    "btcusdt@blockTrade", "btcusdt@referencePrice", "!miniTicker@arr", "!ticker_1d@arr",
]  # fmt: skip


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    with running_fake("--trades-per-second", "50") as f:
        yield f


@pytest.fixture(scope="module")
def fake_frames(fake: Fake) -> dict[str, list[Any]]:
    """Stream -> the payloads it sent, three frames of each at least (20 s at most)."""
    received: dict[str, list[Any]] = {stream: [] for stream in FAKE_STREAMS}
    ws = connect(fake.ws_url("/stream?streams=" + "/".join(FAKE_STREAMS)))
    deadline = time.monotonic() + 20
    try:
        while min(len(payloads) for payloads in received.values()) < 3 and time.monotonic() < deadline:
            message = json.loads(ws.recv())
            received[message["stream"]].append(message["data"])
    finally:
        ws.close()
    assert {stream for stream, payloads in received.items() if len(payloads) < 3} == set()
    return received


def test_the_fake_streams_cover_every_stream_kind() -> None:
    covered = {"kline" if kind.startswith("kline_") else kind for kind in map(_kind_of, FAKE_STREAMS)}
    assert covered == set(SUPPORTED_KINDS)


def _kind_of(stream: str) -> str:
    if stream.startswith("!"):
        return stream[1:].partition("@")[0]
    return stream.split("@")[1]


def as_kept(value: Any) -> Any:
    """A decimal string of more than 15 significant digits as a float64 keeps it."""
    if isinstance(value, list):
        return [as_kept(item) for item in value]
    if isinstance(value, str) and len(value.replace("-", "").replace(".", "").lstrip("0")) > SURE_DIGITS:
        return frames.decimal_string(float(value))
    return value


SURE_DIGITS = 15
"""Significant digits of any decimal that a float64 keeps unchanged (C's DBL_DIG)."""


@pytest.mark.parametrize("stream", FAKE_STREAMS)
def test_a_fake_frame_comes_back_string_for_string(fake_frames: dict[str, list[Any]], stream: str) -> None:
    for original in fake_frames[stream]:
        for item, rebuilt in round_trip(stream, original):
            sent = {field: value for field, value in flat(item).items() if field in flat(rebuilt)}
            assert flat(rebuilt) == {field: as_kept(value) for field, value in sent.items()}
            if not stream.startswith("!"):
                assert frames.stream_name(*rows_of(stream, item)[0], fast_depth="@100ms" in stream) == stream
