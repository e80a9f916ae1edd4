"""Exports to CSV and Parquet, against real SQLite files."""

from __future__ import annotations

import csv
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, select

from worker.ops.export import export_rows, resolve_source
from worker.store.storage import TABLE_COLUMNS, TABLES, store_rows
from worker.times import iso_ms, parse_time

T = 1795482000000  # 2026-11-24T01:00:00Z
MINUTE = 60_000


def trade_rows(symbol: str, count: int, start: int = T, seed: int = 1) -> list[tuple[Any, ...]]:
    """A random walk of trades: several per millisecond at times, REST-backfilled ones
    (no event or receive time) among them, quantities as small as Binance's lot sizes."""
    rnd = random.Random(seed)
    rows, price, at = [], 30000.0, start
    for trade_id in range(1000, 1000 + count):
        at += rnd.choice((0, 0, 1, 7, 40, 250))
        price = round(price + rnd.gauss(0, 2), 2)
        event_time = None if trade_id % 5 == 0 else at + rnd.randint(1, 3)
        received_at = None if event_time is None else event_time + rnd.randint(5, 90)
        qty = round(abs(rnd.gauss(0.05, 0.04)) + 0.00001, 5)
        place = None if received_at is None else trade_id % 3  # received_seq: the trade's place in its flush
        rows.append((symbol, trade_id, price, qty, at, rnd.random() < 0.5, event_time, received_at, place))
    return rows


def kline_rows(
    symbol: str, interval: str, count: int, step_ms: int, start: int = T, seed: int = 2
) -> list[tuple[Any, ...]]:
    """Closed klines of a random walk, as the kline stream stores them."""
    rnd = random.Random(seed)
    rows, price = [], 30000.0
    for i in range(count):
        open_time = start + i * step_ms
        close = round(price + rnd.gauss(0, 15), 2)
        high = round(max(price, close) + abs(rnd.gauss(0, 5)), 2)
        low = round(min(price, close) - abs(rnd.gauss(0, 5)), 2)
        volume = round(abs(rnd.gauss(8, 3)), 5)
        rows.append((
            symbol, interval, open_time, open_time + step_ms - 1, price, high, low, close,
            volume, round(volume * close, 4), rnd.randint(50, 500), round(volume / 2, 5),
            round(volume * close / 2, 4), 100 * i, 100 * i + 99, True, open_time + step_ms,
            open_time + step_ms + 40, 0,
        ))  # fmt: skip
        price = close
    return rows


def store(engine: Engine, rows_by_table: dict[str, list[tuple[Any, ...]]]) -> None:
    with engine.begin() as conn:
        store_rows(conn, rows_by_table)


def in_range(rows: list[tuple[Any, ...]], time_index: int, start: int, end: int) -> list[tuple]:
    chosen = [row for row in rows if start <= row[time_index] < end]
    return sorted(chosen, key=lambda row: (row[time_index], row[1]))


def read_csv(path: Path, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The header, and the rows converted back to the table's Python types."""
    converters = [_converter(column.type.python_type) for column in TABLES[table].columns]
    with path.open(newline="", encoding="utf-8") as file:
        header, *lines = list(csv.reader(file))
    return header, [tuple(convert(value) for convert, value in zip(converters, line, strict=False)) for line in lines]


def _converter(python_type: type) -> Any:
    def convert(text: str) -> Any:
        if text == "":
            return None
        if python_type is bool:
            return {"True": True, "False": False}[text]
        return python_type(text)

    return convert


def test_csv_round_trip_keeps_values_order_and_bounds(engine: Engine, tmp_path: Path) -> None:
    btc, eth = trade_rows("BTCUSDT", 3000), trade_rows("ETHUSDT", 3000, seed=9)
    store(engine, {"trades": btc + eth})
    start, end = btc[500][4], btc[2500][4]  # both bounds fall on stored trade times
    path = tmp_path / "trades.csv"

    written = export_rows(engine, "trade", "btcusdt", start, end, path)

    header, rows = read_csv(path, "trades")
    expected = in_range(btc, 4, start, end)
    assert header == list(TABLE_COLUMNS["trades"])
    assert rows == expected and written == len(expected)
    assert rows[0][4] == start  # start included
    assert max(row[4] for row in rows) < end and any(row[4] == end for row in btc)  # end excluded
    assert any(row[6] is None for row in rows)  # NULL event times survive as empty fields
    assert header[-2:] == ["received_at", "received_seq"] and any(row[7] is not None for row in rows)
    assert not list(tmp_path.glob("*.partial"))


def test_parquet_round_trip_has_the_table_schema(engine: Engine, tmp_path: Path) -> None:
    btc = trade_rows("BTCUSDT", 2000)
    store(engine, {"trades": btc})
    path = tmp_path / "trades.parquet"

    written = export_rows(engine, "trades", "BTCUSDT", T, T + 10 * MINUTE, path, fmt="parquet")

    table = pq.read_table(path)
    assert table.schema == pa.schema([
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("trade_id", pa.int64(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("qty", pa.float64(), nullable=False),
        pa.field("trade_time", pa.int64(), nullable=False),
        pa.field("buyer_is_maker", pa.bool_(), nullable=False),
        pa.field("event_time", pa.int64()),
        pa.field("received_at", pa.int64()),
        pa.field("received_seq", pa.int64()),
    ])  # fmt: skip
    expected = in_range(btc, 4, T, T + 10 * MINUTE)
    assert table.num_rows == written == len(expected)
    assert [tuple(row.values()) for row in table.to_pylist()] == expected


def test_kline_kinds_filter_by_interval(engine: Engine, tmp_path: Path) -> None:
    one_minute = kline_rows("BTCUSDT", "1m", 120, MINUTE)
    five_minutes = kline_rows("BTCUSDT", "5m", 24, 5 * MINUTE)
    store(engine, {"klines": one_minute + five_minutes})
    end = T + 60 * MINUTE

    export_rows(engine, "kline_1m", "BTCUSDT", T, end, tmp_path / "1m.csv")
    export_rows(engine, "klines", "BTCUSDT", T, end, tmp_path / "5m.parquet", "parquet", "5m")
    export_rows(engine, "klines", "BTCUSDT", T, end, tmp_path / "all.csv")

    assert read_csv(tmp_path / "1m.csv", "klines")[1] == in_range(one_minute, 2, T, end)
    parquet_rows = pq.read_table(tmp_path / "5m.parquet").to_pylist()
    assert [tuple(row.values()) for row in parquet_rows] == in_range(five_minutes, 2, T, end)
    both = read_csv(tmp_path / "all.csv", "klines")[1]
    assert len(both) == 60 + 12 and {row[1] for row in both} == {"1m", "5m"}
    assert [row[2] for row in both] == sorted(row[2] for row in both)


@pytest.mark.parametrize(
    ("name", "table"),
    [("trade", "trades"), ("aggTrade", "agg_trades"), ("AGGTRADE", "agg_trades"),
     ("ticker", "tickers"), ("miniTicker", "mini_tickers"), ("bookTicker", "book_tickers"),
     ("avgPrice", "avg_prices"), ("avg_prices", "avg_prices"), ("kline_1M", "klines")],
)  # fmt: skip
def test_stream_kinds_and_table_names_name_tables(name: str, table: str) -> None:
    assert resolve_source(name).table == table


@pytest.mark.parametrize(
    ("name", "market", "table"),
    [("aggTrade", "usdm", "usdm_agg_trades"), ("agg_trades", "coinm", "coinm_agg_trades"),
     ("kline_1h", "usdm", "usdm_klines"), ("markPrice", "usdm", "usdm_mark_prices"),
     ("forceOrder", "coinm", "coinm_liquidations"), ("openInterest", "usdm", "usdm_open_interest"),
     ("fundingRate", "coinm", "coinm_funding_rates"), ("markPriceKline_1m", "coinm", "coinm_mark_price_klines"),
     ("depth", "usdm", "usdm_depth_updates"), ("usdm_mark_prices", "spot", "usdm_mark_prices")],
)  # fmt: skip
def test_a_market_names_its_own_tables(name: str, market: str, table: str) -> None:
    assert resolve_source(name, market=market).table == table


def test_futures_errors_name_the_market(engine: Engine, tmp_path: Path) -> None:
    error = lambda *args, **kwargs: export_error(engine, tmp_path, *args, **kwargs)  # noqa: E731
    message = error("markPrice", "BTCUSDT", T, T + MINUTE)
    assert "unknown table or stream kind 'markPrice' in spot" in message and "avgPrice" in message
    assert message.endswith("; markPrice is a kind of usdm, coinm: add --market usdm")
    message = error("trade", "BTCUSD_PERP", T, T + MINUTE, market="coinm")
    assert "unknown table or stream kind 'trade' in coinm" in message and "coinm_liquidations" in message
    assert "usdm_mark_prices is a table of usdm, not coinm" in error("usdm_mark_prices", "X", T, T + 1, market="coinm")
    message = error("forceOrder", "BTCUSDT", T, T + MINUTE, market="usdm")
    assert "the usdm_liquidations table is empty: record the forceOrder stream first" in message
    assert "binance-recorder subscribe BTCUSDT --market usdm --streams forceOrder" in message
    message = error("fundingRate", "BTCUSDT", T, T + MINUTE, market="usdm")
    assert "binance-recorder backfill BTCUSDT fundingRate --market usdm" in message


def test_a_large_export_streams_in_chunks_with_bounded_memory(engine: Engine, tmp_path: Path) -> None:
    rows = trade_rows("BTCUSDT", 300_000)
    store(engine, {"trades": rows})
    end = rows[-1][4] + 1
    del rows
    progress: list[int] = []

    tracemalloc.start()
    try:
        written = export_rows(engine, "trade", "BTCUSDT", T, end, tmp_path / "big.csv", progress=progress.append)
        export_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with engine.connect() as conn:
            whole = conn.execute(select(TABLES["trades"])).all()
        whole_peak = tracemalloc.get_traced_memory()[1]
        del whole
    finally:
        tracemalloc.stop()

    assert written == 300_000
    assert progress == [20_000 * k for k in range(1, 16)]
    assert export_peak < whole_peak / 5, (export_peak, whole_peak)
    with (tmp_path / "big.csv").open() as file:
        assert sum(1 for _ in file) == 300_001


def export_error(engine: Engine, tmp_path: Path, *args: Any, **kwargs: Any) -> str:
    path = tmp_path / "out.csv"
    with pytest.raises(ValueError) as error:
        export_rows(engine, *args[:4], path, *args[4:], **kwargs)
    assert not path.exists() and not list(tmp_path.glob("*.partial"))
    return str(error.value)


def test_errors_say_what_was_wrong_and_what_to_do(engine: Engine, tmp_path: Path) -> None:
    btc = trade_rows("BTCUSDT", 100)
    others = [trade_rows(f"COIN{i:02}USDT", 1, seed=i)[0] for i in range(12)]
    store(engine, {"trades": btc + others, "klines": kline_rows("BTCUSDT", "1m", 10, MINUTE)})
    error = lambda *args, **kwargs: export_error(engine, tmp_path, *args, **kwargs)  # noqa: E731

    message = error("orderbook", "BTCUSDT", T, T + MINUTE)
    assert "unknown table or stream kind 'orderbook'" in message
    assert "aggTrade" in message and "kline_<interval>" in message and "book_tickers" in message
    assert "the start 2026-11-24T01:00:00.000Z is not before the end" in error("trade", "BTCUSDT", T, T)
    assert "unknown export format 'xlsx': use one of csv, parquet" in error("trade", "BTCUSDT", T, T + MINUTE, "xlsx")
    message = error("trade", "XRPUSDT", T, T + MINUTE)
    assert message.startswith("no trades rows for XRPUSDT: the trades table holds BTCUSDT, COIN00USDT")
    assert "COIN08USDT and more" in message and "COIN09USDT" not in message
    assert "binance-recorder subscribe XRPUSDT --streams trade" in message
    message = error("trade", "BTCUSDT", T - 60 * MINUTE, T - 30 * MINUTE)
    first, last = btc[0][4], btc[-1][4]
    assert f"they run from {iso_ms(first)} to {iso_ms(last)}" in message
    assert "from 2026-11-24T00:00:00.000Z to 2026-11-24T00:30:00.000Z (end excluded)" in message
    assert "its klines have the interval(s) 1m" in error("kline_5m", "BTCUSDT", T, T + MINUTE)
    assert "the agg_trades table is empty: record the aggTrade stream" in error("aggTrade", "BTCUSDT", T, T + MINUTE)
    assert "an interval only applies to klines" in error("trade", "BTCUSDT", T, T + 1, interval="1m")
    assert "unknown kline interval '2m'" in error("kline_2m", "BTCUSDT", T, T + 1)
    assert "the directory" in export_error(engine, tmp_path / "missing", "trade", "BTCUSDT", T, T + 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2026-11-24T01:00", T), ("2026-11-24 01:00:00.250", T + 250), ("2026-11-24", T - 3_600_000),
     ("2026-11-24T03:00+02:00", T), ("2026-11-24T01:00Z", T), ("1795482000000", T),
     ("now", T), ("-30m", T - 30 * MINUTE), ("-2h", T - 120 * MINUTE), ("-1d", T - 1440 * MINUTE)],
)  # fmt: skip
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text, now_ms=T) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("yesterday", "cannot read the time 'yesterday': use an ISO date"),
     ("1795482000", "too small for milliseconds since the epoch"),
     ("-2y", "a time ago such as -30m")],
)  # fmt: skip
def test_parse_time_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_time(text, now_ms=T)
