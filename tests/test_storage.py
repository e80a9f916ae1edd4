"""The schema and the batch inserts, against real SQLite files."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Boolean,
    Engine,
    Float,
    Integer,
    LargeBinary,
    Text,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateTable

from worker.store import storage
from worker.store.storage import (
    FUTURES_TABLES,
    TABLE_COLUMNS,
    TABLES,
    TIME_COLUMNS,
    create_schema,
    make_engine,
    store_rows,
)

T = 1700000000000
R = T + 120  # received_at: the clock mark of the frame's flush
S = 3  # received_seq: the frame's place in its flush

# One row per table, in TABLE_COLUMNS order.
SAMPLE_ROWS: dict[str, tuple[Any, ...]] = {
    "trades": ("BTCUSDT", 1, 30000.5, 0.01, T, True, T + 1, R, S),
    "agg_trades": ("BTCUSDT", 1, 30000.5, 0.01, 10, 12, T, False, T + 1, R, S),
    "klines": (
        "BTCUSDT",
        "1m",
        T,
        T + 59999,
        1.0,
        2.0,
        0.5,
        1.5,
        100.0,
        150.0,
        7,
        50.0,
        75.0,
        10,
        16,
        True,
        T + 60000,
        R,
        S,
    ),  # fmt: skip
    "tickers": (
        "BTCUSDT",
        T,
        0.5,
        1.25,
        30000.1,
        29999.5,
        30000.0,
        0.1,
        29999.9,
        1.0,
        30000.1,
        2.0,
        29999.5,
        30100.0,
        29900.0,
        1234.5,
        37000000.0,
        T - 86400000,
        T,
        1,
        100,
        100,
        R,
        S,
    ),  # fmt: skip
    "mini_tickers": ("BTCUSDT", T, 30000.0, 29999.5, 30100.0, 29900.0, 1234.5, 37000000.0, R, S),
    "book_tickers": ("BTCUSDT", 400900217, 29999.9, 1.0, 30000.1, 2.0, R, S),
    "avg_prices": ("BTCUSDT", T, "5m", 30000.25, T - 1000, R, S),
    "depth_updates": ("BTCUSDT", 160, 157, T, b"\x00" * 16, b"", T + 5, S),
    "depth_snapshots": ("BTCUSDT", 150, b"\x00" * 32, b"\x00" * 16, T, None),  # from REST: no place
    "partial_depth": ("BTCUSDT", 5, 160, b"\x00" * 80, b"\x00" * 80, T, S),
    "window_tickers": (
        "BTCUSDT",
        "1h",
        T,
        0.5,
        1.25,
        1.0,
        2.0,
        0.5,
        1.5,
        1.2,
        100.0,
        150.0,
        T - 3600000,
        T,
        1,
        100,
        100,
        T + 5,
        S,
    ),  # fmt: skip
    "block_trades": ("BTCUSDT", 582, 0.052, 5838.0, T - 200, True, T, T + 5, S),
    "reference_prices": ("BTCUSDT", T, 1.0, T + 5, S),
}


def _futures_sample_row(table: str) -> tuple[Any, ...]:
    """A row of a futures table by its column types (their parsing: tests/test_futures.py)."""
    by_type = {BigInteger: T, Integer: 5, Float: 1.5, Boolean: True, LargeBinary: b"\x00" * 16, Text: "[]"}
    names = {"received_at": R, "received_seq": S, "interval": "1m", "symbol": "BTCUSDT", "pair": "BTCUSD"}
    return tuple(names[c.name] if c.name in names else by_type.get(type(c.type), "x") for c in TABLES[table].columns)


SAMPLE_ROWS.update({table: _futures_sample_row(table) for table in FUTURES_TABLES})


def count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(TABLES[table])).scalar_one()


def batch_of_samples() -> dict[str, list[tuple[Any, ...]]]:
    return {table: [row] for table, row in SAMPLE_ROWS.items()}


RECORD_TABLES = {"gaps", "listing_changes", "exchange_info_snapshots", "archived_days", "audits"}
"""The tables besides the data tables: backfill's gaps, listing changes, daily exchangeInfo, day files written."""


def test_sample_rows_match_the_column_order_contract() -> None:
    assert {t: len(row) for t, row in SAMPLE_ROWS.items()} == {t: len(columns) for t, columns in TABLE_COLUMNS.items()}


def test_make_engine_creates_the_directory_and_sets_the_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there.db"
    engine = make_engine(f"sqlite:///{path}", busy_timeout_ms=1234)
    with engine.connect() as conn:
        pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("busy_timeout") == 1234
        assert pragma("synchronous") == 1  # NORMAL
    assert path.exists()


def test_create_schema_twice_is_fine(engine: Engine) -> None:
    create_schema(engine)
    inspector = inspect(engine)
    # PostgreSQL's daily partitions are tables too (tests/test_partitions.py).
    partitions = re.compile(r".+_(p\d{8}|default)$")
    assert {t for t in inspector.get_table_names() if not partitions.match(t)} == set(TABLES) | RECORD_TABLES
    assert inspector.get_view_names() == ["market_data"]
    assert [c["name"] for c in inspector.get_columns("trades")] == list(TABLE_COLUMNS["trades"])


def test_create_schema_tolerates_a_competitor_creating_a_table_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    competitor = make_engine(url)

    def competitor_creates_it(table: Any, connection: Any, **kw: Any) -> None:
        with competitor.begin() as conn:
            conn.execute(CreateTable(table))

    # Between create_all's check and its CREATE TABLE, another process creates the table.
    event.listen(storage.trades, "before_create", competitor_creates_it)
    try:
        create_schema(make_engine(url))
    finally:
        event.remove(storage.trades, "before_create", competitor_creates_it)
    assert set(inspect(competitor).get_table_names()) == set(TABLES) | RECORD_TABLES


def _create_schema_when_all_are_ready(url: str, barrier: Any) -> None:
    barrier.wait()
    create_schema(make_engine(url))


def test_create_schema_from_several_processes_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crowd.db'}"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    processes = [context.Process(target=_create_schema_when_all_are_ready, args=(url, barrier)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert set(inspect(make_engine(url)).get_table_names()) == set(TABLES) | RECORD_TABLES


def test_rows_are_stored_in_column_order(engine: Engine) -> None:
    with engine.begin() as conn:
        store_rows(conn, batch_of_samples())
    with engine.connect() as conn:
        for table, row in SAMPLE_ROWS.items():
            assert tuple(conn.execute(select(TABLES[table])).one()) == row


def test_the_same_batch_twice_is_stored_once(engine: Engine) -> None:
    with engine.begin() as conn:
        first = store_rows(conn, batch_of_samples())
    with engine.begin() as conn:
        second = store_rows(conn, batch_of_samples())
    assert first == {table: 1 for table in SAMPLE_ROWS}
    # The sample kline is closed; a replayed open kline would be rewritten (and counted).
    assert second == {table: 0 for table in SAMPLE_ROWS}
    assert {table: count(engine, table) for table in SAMPLE_ROWS} == first


def test_rows_already_stored_are_skipped_within_a_batch(engine: Engine) -> None:
    trade = SAMPLE_ROWS["trades"]
    newer = (trade[0], 2, *trade[2:])
    with engine.begin() as conn:
        assert store_rows(conn, {"trades": [trade, trade, newer]}) == {"trades": 2}
    assert count(engine, "trades") == 2


def test_a_batch_overlapping_stored_rows_stores_the_rest_in_the_same_transaction(engine: Engine) -> None:
    """On PostgreSQL the COPY of such a batch is undone and the batch goes through the
    staging table; the transaction goes on with the next table."""
    trades = [(SAMPLE_ROWS["trades"][0], n, *SAMPLE_ROWS["trades"][2:]) for n in range(1, 5)]
    with engine.begin() as conn:
        store_rows(conn, {"trades": trades[:2]})
    with engine.begin() as conn:
        stored = store_rows(conn, {"trades": trades[1:], "agg_trades": [SAMPLE_ROWS["agg_trades"]]})
    assert stored == {"trades": 2, "agg_trades": 1}
    assert (count(engine, "trades"), count(engine, "agg_trades")) == (4, 1)


def test_a_row_the_schema_refuses_fails_its_batch_with_the_database_error(engine: Engine) -> None:
    no_price = (*SAMPLE_ROWS["trades"][:2], None, *SAMPLE_ROWS["trades"][3:])
    with pytest.raises(IntegrityError, match="(?i)null"), engine.begin() as conn:
        store_rows(conn, {"trades": [SAMPLE_ROWS["trades"], no_price]})
    assert count(engine, "trades") == 0


def kline(close: float, is_closed: bool, event_time: int) -> tuple[Any, ...]:
    row = list(SAMPLE_ROWS["klines"])
    row[7], row[15], row[16] = close, is_closed, event_time
    return tuple(row)


def test_an_open_kline_is_replaced_until_it_closes(engine: Engine) -> None:
    updates = [
        kline(close=1.0, is_closed=False, event_time=T + 1000),
        kline(close=2.0, is_closed=False, event_time=T + 3000),
        kline(close=1.5, is_closed=False, event_time=T + 2000),  # older, committed later (two drain runs)
        kline(close=3.0, is_closed=True, event_time=T + 60000),
        kline(close=2.5, is_closed=False, event_time=T + 5000),  # late, after the close
    ]
    written, stored = [], []
    for update in updates:
        with engine.begin() as conn:
            written.append(store_rows(conn, {"klines": [update]})["klines"])
            stored.append(conn.execute(select(storage.klines.c.close)).scalar_one())
    assert written == [1, 1, 0, 1, 0]
    assert stored == [1.0, 2.0, 2.0, 3.0, 3.0]  # never back to an older version
    with engine.connect() as conn:
        assert tuple(conn.execute(select(storage.klines)).one()) == updates[3]


def test_market_data_view_has_the_original_shape(engine: Engine) -> None:
    trade = SAMPLE_ROWS["trades"]
    with engine.begin() as conn:
        store_rows(conn, {"trades": [trade, ("ETHUSDT", 7, 2000.25, 1.0, T + 5, False, None, None, None)]})
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT symbol, price, timestamp FROM market_data ORDER BY 1"))
        assert rows.all() == [("BTCUSDT", 30000.5, T), ("ETHUSDT", 2000.25, T + 5)]


def test_a_rolled_back_transaction_leaves_nothing(engine: Engine) -> None:
    with engine.connect() as conn:
        transaction = conn.begin()
        assert sum(store_rows(conn, batch_of_samples()).values()) == len(SAMPLE_ROWS)
        transaction.rollback()
    assert {table: count(engine, table) for table in SAMPLE_ROWS} == dict.fromkeys(SAMPLE_ROWS, 0)


@pytest.mark.parametrize("rows", [[], ()], ids=["empty list", "empty tuple"])
def test_empty_row_lists_are_skipped(engine: Engine, rows: Sequence[tuple]) -> None:
    with engine.begin() as conn:
        assert store_rows(conn, {"trades": rows, "klines": rows}) == {"trades": 0, "klines": 0}


def test_rows_may_come_as_any_sequence(engine: Engine) -> None:
    with engine.begin() as conn:
        assert store_rows(conn, {"trades": (SAMPLE_ROWS["trades"],)}) == {"trades": 1}


def test_time_columns_date_every_table() -> None:
    assert set(TIME_COLUMNS) == set(TABLES)
    assert all(column in TABLE_COLUMNS[table] for table, column in TIME_COLUMNS.items())


def test_postgresql_gets_the_same_conflict_rules() -> None:
    """No PostgreSQL server here: check the SQL that store_rows would send it."""
    dialect = postgresql.dialect()
    trades_sql = str(storage._insert_statement("postgresql", "trades").compile(dialect=dialect))
    klines_sql = str(storage._insert_statement("postgresql", "klines").compile(dialect=dialect))
    assert trades_sql.endswith("ON CONFLICT DO NOTHING")
    assert "ON CONFLICT (symbol, interval, open_time) DO UPDATE SET close_time = " in klines_sql
    assert klines_sql.endswith(
        "WHERE klines.is_closed = false AND (excluded.event_time IS NULL OR klines.event_time IS NULL "
        "OR excluded.event_time >= klines.event_time)"
    )


def test_create_schema_adds_indexes_missing_from_an_older_database(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    create_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_trades_trade_time")

    create_schema(engine)

    assert "ix_trades_trade_time" in {ix["name"] for ix in inspect(engine).get_indexes("trades")}


def test_every_data_table_records_the_receive_time_and_place(engine: Engine) -> None:
    assert all(TABLE_COLUMNS[table][-2:] == ("received_at", "received_seq") for table in TABLES)
    with engine.begin() as conn:
        store_rows(conn, batch_of_samples())
        stored = {
            table: tuple(conn.execute(text(f"select received_at, received_seq from {table}")).one()) for table in TABLES
        }
    assert stored == {table: SAMPLE_ROWS[table][-2:] for table in TABLES}


def test_a_database_made_before_received_seq_gets_it_on_start(engine: Engine) -> None:
    """On PostgreSQL `trades` is partitioned: the column added to the parent reaches its
    partitions, the default one included (the sample's time is years before today)."""
    with engine.begin() as conn:  # the tables as the version before received_seq made them
        for table in ("trades", "book_tickers"):
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN received_seq")

    create_schema(engine)
    with engine.begin() as conn:
        store_rows(conn, {"trades": [SAMPLE_ROWS["trades"]], "book_tickers": [SAMPLE_ROWS["book_tickers"]]})
        stored = [conn.execute(text(f"select received_seq from {t}")).scalar_one() for t in ("trades", "book_tickers")]

    assert stored == [S, S]


def test_a_database_of_an_older_version_gets_received_at_on_start(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # the trades table as versions before received_at made it
        old.execute(
            "CREATE TABLE trades (symbol VARCHAR(32) NOT NULL, trade_id BIGINT NOT NULL, price FLOAT NOT NULL,"
            " qty FLOAT NOT NULL, trade_time BIGINT NOT NULL, buyer_is_maker BOOLEAN NOT NULL, event_time BIGINT,"
            " PRIMARY KEY (symbol, trade_id))"
        )
        old.execute("INSERT INTO trades VALUES ('BTCUSDT', 1, 1.0, 1.0, 5, 1, 6)")
    engine = make_engine(f"sqlite:///{path}")

    create_schema(engine)
    with engine.begin() as conn:
        store_rows(conn, {"trades": [SAMPLE_ROWS["trades"][:1] + (2,) + SAMPLE_ROWS["trades"][2:]]})
        stored = conn.execute(text("select trade_id, received_at, received_seq from trades order by trade_id")).all()

    assert [c["name"] for c in inspect(engine).get_columns("trades")] == list(TABLE_COLUMNS["trades"])
    assert [tuple(row) for row in stored] == [(1, None, None), (2, *SAMPLE_ROWS["trades"][-2:])]


def test_a_replay_reads_a_window_of_diffs_by_the_receive_time_index(tmp_path: Path) -> None:
    """A replay's queries on depth_updates (its window by receive time, in that order;
    the window's symbols) seek the index instead of scanning and sorting the table
    (SQLite's plan; PostgreSQL plans by its statistics)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    create_schema(engine)
    window = "FROM depth_updates WHERE received_at >= 1 AND received_at < 2"
    with engine.connect() as conn:
        ordered = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN SELECT * {window} ORDER BY received_at").all()
        symbols = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN SELECT DISTINCT symbol {window}").all()
    assert [row[-1] for row in ordered] == [
        "SEARCH depth_updates USING INDEX ix_depth_updates_received_at (received_at>? AND received_at<?)"
    ]
    assert "COVERING INDEX ix_depth_updates_received_at" in symbols[0][-1]
