"""Day files: the archiver, retention that requires it, and export, book and frames over
the database and the files together; real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, func, select

from tests.test_export import kline_rows, trade_rows
from worker.ops.book import BookUnknown, book_at
from worker.ops.book_export import export_book
from worker.ops.export import export_rows
from worker.settings import Settings
from worker.store import dayfiles
from worker.store.depth import pack_levels, snapshot_row
from worker.store.partitions import DAY_MS, day_start, ensure_partitions
from worker.store.retention import RetentionPolicy, delete_expired_rows
from worker.store.storage import TABLES, archived_days, create_schema, make_engine, store_rows

D0 = day_start(1795482000000)  # 2026-11-24
D1 = D0 + DAY_MS
TODAY = D1 + DAY_MS
NOW = TODAY + 3_600_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def trades_of(symbol: str, day: int, count: int, first_id: int, seed: int) -> list[tuple[Any, ...]]:
    """`count` trades from 01:00 of `day`, ids from `first_id`."""
    return [(row[0], first_id + i, *row[2:]) for i, row in enumerate(trade_rows(symbol, count, day + 3_600_000, seed))]


def fill(engine: Engine) -> dict[str, int]:
    """Trades of two symbols and 1m klines on D0, D1 and today; returns rows per table and day."""
    rows: dict[str, list[tuple[Any, ...]]] = {"trades": [], "klines": []}
    for day_index, day in enumerate((D0, D1, TODAY)):
        for number, symbol in enumerate(SYMBOLS):
            seed = 10 * day_index + number
            rows["trades"] += trades_of(symbol, day, 200 + 50 * number, 10_000 * (day_index + 1), seed)
            rows["klines"] += kline_rows(symbol, "1m", 30, 60_000, start=day, seed=seed)
    with engine.begin() as conn:
        store_rows(conn, rows)
    return {table: len(found) for table, found in rows.items()}


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    """The schema with PostgreSQL's daily partitions from D0 on, so that retention drops them."""
    engine = make_engine(database_url)
    create_schema(engine, now_ms=D0)
    ensure_partitions(engine, D0, days_ahead=3)
    yield engine
    engine.dispose()


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[Engine]:
    """A SQLite file, for what does not differ between the databases."""
    engine = make_engine(f"sqlite:///{tmp_path / 'db' / 'binance.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


def requiring_archive(days: int = 1) -> RetentionPolicy:
    settings = Settings.from_env({"RETENTION_DAYS": str(days), "RETENTION_OVERRIDES": ""})
    assert settings.retention_requires_archive
    return RetentionPolicy.from_settings(settings)


def count(engine: Engine, table: str, start: int, end: int) -> int:
    time_column = TABLES[table].c[dayfiles.TIME_COLUMNS[table]]
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).where(time_column >= start, time_column < end)) or 0)


def test_closed_days_go_to_verified_files_once_and_retention_deletes_only_them(db: Engine, tmp_path: Path) -> None:
    fill(db)
    archive = tmp_path / "archive"
    run = dayfiles.archive_days(db, archive, NOW)
    day0, day1 = "2026-11-24", "2026-11-25"
    expected = {
        f"table={table}/date={day}/symbol={symbol}.parquet"
        for table in ("trades", "klines")
        for day in (day0, day1)
        for symbol in SYMBOLS
    }
    assert set(run.written) == expected and not run.refused
    assert run.written[f"table=trades/date={day0}/symbol=ETHUSDT.parquet"] == 250
    assert sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*")) == sorted(
        {*expected, *(str(Path(p).parent) for p in expected), "table=trades", "table=klines"}
    )  # nothing else: no .partial left, today not written
    written = pq.read_table(archive / f"table=trades/date={day0}/symbol=BTCUSDT.parquet")
    assert written.num_rows == 200 and written.schema.field("trade_id").type == "int64"
    assert (
        pq.ParquetFile(archive / f"table=trades/date={day0}/symbol=BTCUSDT.parquet")
        .metadata.row_group(0)
        .column(0)
        .compression
        == "ZSTD"
    )
    with db.connect() as conn:
        records = conn.execute(select(archived_days).where(archived_days.c.table_name == "trades")).all()
    assert {(r.day, r.symbol, r.rows, r.db_rows) for r in records} == {
        (day, symbol, rows, rows) for day in (day0, day1) for symbol, rows in zip(SYMBOLS, (200, 250), strict=True)
    }
    assert all(r.bytes == (archive / r.path).stat().st_size for r in records)

    again = dayfiles.archive_days(db, archive, NOW)
    assert (again.written, again.unchanged_days) == ({}, 4)  # idempotent: 2 tables x 2 days

    run = delete_expired_rows(db, requiring_archive(days=1), NOW)
    assert run.cutoffs == {table: D1 for table in dayfiles.TIME_COLUMNS}  # whole days only
    assert count(db, "trades", D0, D1) == 0 and count(db, "trades", D1, TODAY) == 450
    if db.dialect.name == "postgresql":
        assert run.dropped["trades"] == ["trades_p20261124"]  # the archived day's partition, dropped whole
    else:
        assert (run.deleted["trades"], run.deleted["klines"]) == (450, 60)


def test_retention_keeps_days_that_are_not_archived_unless_told_otherwise(db: Engine, tmp_path: Path) -> None:
    fill(db)
    held = delete_expired_rows(db, requiring_archive(days=1), NOW)
    assert held.cutoffs["trades"] == D0 and count(db, "trades", D0, D1) == 450
    archive = tmp_path / "archive"
    dayfiles.archive_days(db, archive, NOW)
    with db.begin() as conn:  # a late trade for D0 after its day was archived
        store_rows(conn, {"trades": trades_of("BTCUSDT", D0, 1, 99_999, seed=7)})
    assert delete_expired_rows(db, requiring_archive(days=1), NOW).cutoffs["trades"] == D0
    assert count(db, "trades", D0, D1) == 451
    delete_only = RetentionPolicy.from_settings(
        Settings.from_env({"RETENTION_DAYS": "1", "RETENTION_REQUIRES_ARCHIVE": "false"})
    )
    assert delete_only.cutoffs(NOW)["trades"] == NOW - DAY_MS
    delete_expired_rows(db, delete_only, NOW)
    assert count(db, "trades", D0, D1) == 0 and count(db, "trades", D1, NOW - DAY_MS) == 0


def test_a_late_row_for_an_archived_and_deleted_day_is_merged_into_its_file(db: Engine, tmp_path: Path) -> None:
    fill(db)
    archive = tmp_path / "archive"
    dayfiles.archive_days(db, archive, NOW)
    delete_expired_rows(db, requiring_archive(days=1), NOW)
    late = trades_of("BTCUSDT", D0, 1, 99_999, seed=7)
    with db.begin() as conn:
        store_rows(conn, {"trades": late})
    assert delete_expired_rows(db, requiring_archive(days=1), NOW).cutoffs["trades"] == D0  # not archived yet
    run = dayfiles.archive_days(db, archive, NOW)
    assert run.written == {"table=trades/date=2026-11-24/symbol=BTCUSDT.parquet": 201}
    ids = pq.read_table(archive / "table=trades/date=2026-11-24/symbol=BTCUSDT.parquet").column("trade_id")
    assert 99_999 in ids.to_pylist() and len(set(ids.to_pylist())) == 201
    delete_expired_rows(db, requiring_archive(days=1), NOW)
    assert count(db, "trades", D0, D1) == 0
    path = tmp_path / "d0.csv"
    assert export_rows(db, "trade", "BTCUSDT", D0, D1, path, archive_dir=archive) == 201


def test_a_day_deleted_by_retention_exports_byte_for_byte_as_before(db: Engine, tmp_path: Path) -> None:
    fill(db)
    archive = tmp_path / "archive"
    before = {
        (kind, fmt): export_rows(db, kind, "ETHUSDT", D0 + 1, TODAY + 1, tmp_path / f"before-{kind}.{fmt}", fmt=fmt)
        for kind in ("trade", "kline_1m")
        for fmt in ("csv", "parquet")
    }
    dayfiles.archive_days(db, archive, NOW)
    delete_expired_rows(db, requiring_archive(days=1), NOW)
    assert count(db, "trades", D0, D1) == count(db, "klines", D0, D1) == 0
    for (kind, fmt), rows in before.items():
        after = tmp_path / f"after-{kind}.{fmt}"
        assert export_rows(db, kind, "ETHUSDT", D0 + 1, TODAY + 1, after, fmt=fmt, archive_dir=archive) == rows
        old = tmp_path / f"before-{kind}.{fmt}"
        if fmt == "csv":
            assert after.read_bytes() == old.read_bytes()
        else:
            assert pq.read_table(after).equals(pq.read_table(old))
    with pytest.raises(ValueError, match="no trades rows for ETHUSDT"):
        export_rows(db, "trade", "ETHUSDT", D0, D1, tmp_path / "x.csv")  # the database alone has none


def test_a_day_partly_deleted_reads_the_union_of_file_and_database(lite: Engine, tmp_path: Path) -> None:
    """Retention stopped half way through a day: the file has it all, the database some."""
    rows = fill(lite)
    archive = tmp_path / "archive"
    dayfiles.archive_days(lite, archive, NOW)
    before = tmp_path / "before.csv"
    export_rows(lite, "trade", "BTCUSDT", D0, TODAY, before)
    trades = TABLES["trades"]
    with lite.begin() as conn:
        conn.execute(trades.delete().where(trades.c.symbol == "BTCUSDT", trades.c.trade_id < 10_100))
    after = tmp_path / "after.csv"
    assert export_rows(lite, "trade", "BTCUSDT", D0, TODAY, after, archive_dir=archive) == 400
    assert after.read_bytes() == before.read_bytes() and rows["trades"] == 1350


def test_a_failed_write_leaves_no_file_and_no_record(
    lite: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(lite)
    archive = tmp_path / "archive"
    stale = archive / "table=trades/date=2026-11-24/symbol=BTCUSDT.parquet.partial"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by a crash")  # what a killed archiver leaves at worst
    written = 0

    def failing_batch(*args: Any) -> Any:
        nonlocal written
        written += 1
        if written == 3:
            raise OSError("disk full")
        return real_batch(*args)

    real_batch = dayfiles.record_batch
    monkeypatch.setattr(dayfiles, "record_batch", failing_batch)
    with pytest.raises(OSError, match="disk full"):
        dayfiles.archive_days(lite, archive, NOW)
    monkeypatch.undo()
    # One batch per file: D0's two files were written, D1's first failed and left nothing.
    assert sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*.parquet*")) == [
        "table=trades/date=2026-11-24/symbol=BTCUSDT.parquet",
        "table=trades/date=2026-11-24/symbol=ETHUSDT.parquet",
    ]
    with lite.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(archived_days)) == 2
    run = dayfiles.archive_days(lite, archive, NOW)
    assert len(run.written) == 6 and not list(archive.rglob("*.partial"))


def book_rows(day: int, first_id: int, events: int) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """A snapshot at `first_id` and `events` one-id updates after it, 100 ms apart from 10:00."""
    rnd = random.Random(first_id)
    start = day + 10 * 3_600_000
    snapshot = snapshot_row(
        "BTCUSDT", {"lastUpdateId": first_id, "bids": [["100", "1"], ["99", "2"]], "asks": [["101", "1"]]}, start - 5
    )
    updates = []
    for i in range(1, events + 1):
        bid = [[f"{rnd.choice((98, 99, 100, 99.5))}", f"{rnd.choice((0, 0.5, 1.25))}"]]
        ask = [[f"{rnd.choice((101, 102, 101.5))}", f"{rnd.choice((0, 2, 3))}"]]
        row = (
            "BTCUSDT",
            first_id + i,
            first_id + i,
            start + 100 * i,
            pack_levels(bid),
            pack_levels(ask),
            start + 100 * i + 9,
            0,  # received_seq: each update the first frame of its flush
        )
        updates.append(row)
    return snapshot, updates


def test_a_book_in_a_deleted_day_is_rebuilt_from_its_files(db: Engine, tmp_path: Path) -> None:
    snapshots, updates = [], []
    for day, first_id in ((D0, 1000), (D1, 5000), (TODAY, 9000)):
        snapshot, events = book_rows(day, first_id, 300)
        snapshots.append(snapshot)
        updates += events
    with db.begin() as conn:
        store_rows(conn, {"depth_snapshots": snapshots, "depth_updates": updates})
    at = D0 + 10 * 3_600_000 + 12_345
    book = book_at(db, "BTCUSDT", at)
    export_book(db, "BTCUSDT", at - 20_000, at + 20_000, 500, 3, tmp_path / "before.csv")
    archive = tmp_path / "archive"
    dayfiles.archive_days(db, archive, NOW)
    delete_expired_rows(db, requiring_archive(days=1), NOW)
    assert count(db, "depth_updates", D0, D1) == count(db, "depth_snapshots", D0, D1) == 0
    with pytest.raises(BookUnknown):
        book_at(db, "BTCUSDT", at)
    assert book_at(db, "BTCUSDT", at, archive_dir=archive) == book and book.update_id == 1123
    export_book(db, "BTCUSDT", at - 20_000, at + 20_000, 500, 3, tmp_path / "after.csv", archive_dir=archive)
    assert (tmp_path / "after.csv").read_bytes() == (tmp_path / "before.csv").read_bytes()
    later = D1 + 10 * 3_600_000 + 5_000  # a day still in the database reads it as before
    assert book_at(db, "BTCUSDT", later, archive_dir=archive) == book_at(db, "BTCUSDT", later)


def test_a_day_closes_when_the_drain_stored_past_it_or_a_day_after_it_ended(lite: Engine) -> None:
    engine = lite
    with engine.begin() as conn:
        store_rows(conn, {"trades": trades_of("BTCUSDT", D0, 3, 1, 1)})
    with engine.connect() as conn:
        assert dayfiles.closed_days(conn, TABLES["trades"], D0 + 5 * 3_600_000) == []  # today
        assert dayfiles.closed_days(conn, TABLES["trades"], NOW - DAY_MS) == []  # nothing stored after D0 yet
        assert dayfiles.closed_days(conn, TABLES["trades"], D1 + DAY_MS) == [D0]  # a whole day later
    with engine.begin() as conn:
        store_rows(conn, {"trades": trades_of("BTCUSDT", D1, 3, 10, 2)})
    with engine.connect() as conn:
        assert dayfiles.closed_days(conn, TABLES["trades"], NOW - DAY_MS) == [D0]  # the drain stored past D0


def test_load_gives_one_frame_over_the_database_and_the_day_files(lite: Engine, tmp_path: Path) -> None:
    import pandas as pd
    import polars

    from worker.ops.dataframes import Selection, load

    fill(lite)
    url = lite.url.render_as_string(hide_password=False)
    archive = tmp_path / "archive"
    before = load("trade", "ETHUSDT", D0, TODAY + DAY_MS, database_url=url, archive_dir=archive)
    dayfiles.archive_days(lite, archive, NOW)
    delete_expired_rows(lite, requiring_archive(days=1), NOW)
    assert count(lite, "trades", D0, D1) == 0
    after = load("trade", "ethusdt", D0, TODAY + DAY_MS, database_url=url, archive_dir=archive)
    pd.testing.assert_frame_equal(after, before)
    assert len(after) == 750 and list(after.columns) == list(TABLES["trades"].columns.keys())
    assert after.trade_id.dtype == "Int64" and after.trade_time.is_monotonic_increasing
    assert after.event_time.isna().sum() == 150  # REST-backfilled rows (every fifth) have none: <NA>, not NaN
    assert after.trade_time.min() >= D0 + 3_600_000  # D0's rows, from its file
    frame = Selection("trades", "ETHUSDT", "2026-11-24", "2026-11-25", database_url=url, archive_dir=archive).polars()
    assert isinstance(frame, polars.DataFrame) and frame.height == 250
    assert frame["trade_id"].to_list() == after.trade_id[:250].tolist()
    candles = load("kline_1m", "BTCUSDT", D0, D1, database_url=url, archive_dir=archive)
    assert len(candles) == 30 and set(candles.interval) == {"1m"}


def test_duckdb_reads_the_day_files_directly(lite: Engine, tmp_path: Path) -> None:
    import duckdb

    fill(lite)
    archive = tmp_path / "archive"
    dayfiles.archive_days(lite, archive, NOW)
    query = (
        "select date, symbol, count(*) as trades, round(sum(price * qty), 2) as notional "
        f"from '{archive}/table=trades/**/*.parquet' group by date, symbol order by date, symbol"
    )
    found = duckdb.sql(query).fetchall()
    trades = TABLES["trades"]
    with lite.connect() as conn:
        expected = [
            (day, symbol, conn.scalar(select(func.count()).where(trades.c.symbol == symbol, *window)))
            for day, window in (
                ("2026-11-24", (trades.c.trade_time >= D0, trades.c.trade_time < D1)),
                ("2026-11-25", (trades.c.trade_time >= D1, trades.c.trade_time < TODAY)),
            )
            for symbol in SYMBOLS
        ]
    assert [(str(date), symbol, rows) for date, symbol, rows, _ in found] == expected


def test_the_archive_command_runs_the_task_on_a_real_worker_one_run_at_a_time(tmp_path: Path) -> None:
    import subprocess
    import sys

    import redis

    from tests.conftest import clean_env
    from worker.keys import RedisKeys
    from worker.ops.local_stack import CELERY, LocalStack
    from worker.times import now_ms

    today = day_start(now_ms())
    stack = LocalStack(tmp_path, env=clean_env())
    try:
        url = stack.start_redis()
        stack.spawn("worker", [*CELERY, "worker", "-Q", "celery", "-c", "1", "-n", "default@%h", "-l", "INFO"])
        engine = make_engine(stack.env["DATABASE_URL"])
        create_schema(engine)
        rows = [trades_of("BTCUSDT", today - DAY_MS * back, 5, 100 * back, back) for back in (2, 1, 0)]
        with engine.begin() as conn:
            store_rows(conn, {"trades": [row for day in rows for row in day]})
        stack.wait_for_workers(["worker"])

        def archive_command() -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "worker.ops.cli", "archive", "--timeout", "60"]
            return subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=90)

        client = redis.Redis.from_url(url)
        client.set(RedisKeys(Settings().redis_prefix).archive_lock, "someone else")
        busy = archive_command()
        client.delete(RedisKeys(Settings().redis_prefix).archive_lock)
        done = archive_command()
        again = archive_command()
    finally:
        stack.stop()
    assert (busy.returncode, busy.stderr.strip()) == (1, "not started: another archiver run is in progress")
    archive = Path(engine.url.database or "").parent / "archive"  # ARCHIVE_DIR's default: beside the database
    days = [dayfiles.day_text(today - DAY_MS * back) for back in (2, 1)]
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [
        f"         5 rows  {archive}/table=trades/date={day}/symbol=BTCUSDT.parquet" for day in days
    ]
    assert done.stdout.splitlines()[2].startswith("2 files, ")
    assert again.stdout.startswith("0 files, 0 bytes; 2 days unchanged")
    assert pq.read_table(archive / f"table=trades/date={days[0]}/symbol=BTCUSDT.parquet").num_rows == 5


def test_the_disk_bench_measures_every_table_the_fake_filled(tmp_path: Path) -> None:
    from bench.database import Databases
    from bench.disk import measure, render

    result = measure(3.0, tmp_path, Databases(None))
    recorded = set(result["rows"])
    assert {"trades", "agg_trades", "depth_updates", "depth_snapshots", "usdm_trades", "usdm_mark_prices"} <= recorded
    assert set(result["sqlite"]) == set(result["parquet"]) == recorded
    assert all(figure > 0 for figure in result["parquet"].values())
    assert result["parquet_files"]["trades"] in (3, 6)  # one file per symbol and day (6 across midnight)
    table = render(result).splitlines()
    assert table[0] == "| Table | Rows | SQLite bytes/row | Parquet (zstd) bytes/row |"
    assert len(table) == 2 + len(recorded)


def test_the_disk_bench_prices_a_day_of_the_whole_market(tmp_path: Path) -> None:
    from bench.database import Databases
    from bench.disk import DAY_SECONDS, measure, render_day
    from worker.settings import Settings

    result = measure(2.0, tmp_path, Databases(None), market=True)
    tables = {"trades", "agg_trades", "book_tickers", "depth_updates", "depth_snapshots"}
    assert set(result["rows"]) == tables and all(result["sqlite"][table] > 20 for table in tables)
    per_day = result["market"]["rows_per_day"]
    assert per_day["trades"] == result["rows"]["trades"] * DAY_SECONDS / 2.0
    assert 0.8 * 40_000 / 3.3 * DAY_SECONDS < per_day["trades"] < 1.2 * 40_000 / 3 * DAY_SECONDS
    assert per_day["depth_snapshots"] == 1500 * DAY_SECONDS / Settings.depth_snapshot_interval_seconds
    assert result["sqlite"]["depth_snapshots"] > 50 * result["sqlite"]["depth_updates"]  # 1,000 levels a side
    table = render_day(result).splitlines()
    assert table[0] == "| Table | Rows/day | SQLite GB/day |"
    assert [line.split(" |")[0] for line in table[-2:]] == ["| **all**", "| **without depth**"]
    assert len(table) == 2 + len(tables) + 2


def test_a_file_whose_day_changed_while_it_was_written_is_refused_then_written(lite: Engine, tmp_path: Path) -> None:
    from sqlalchemy import event

    fill(lite)
    archive = tmp_path / "archive"
    other = make_engine(lite.url.render_as_string(hide_password=False))  # the drain, storing a late row
    late = trades_of("BTCUSDT", D0, 1, 99_999, seed=7)

    def store_late_row_once(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("SELECT trades.symbol") and "ORDER BY" in statement and late:
            with other.begin() as writer:
                store_rows(writer, {"trades": [late.pop()]})

    event.listen(lite, "before_cursor_execute", store_late_row_once)
    run = dayfiles.archive_days(lite, archive, NOW)
    event.remove(lite, "before_cursor_execute", store_late_row_once)
    first = "table=trades/date=2026-11-24/symbol=BTCUSDT.parquet"
    assert run.refused == [first] and first not in run.written and not (archive / first).exists()
    assert not list(archive.rglob("*.partial"))
    again = dayfiles.archive_days(lite, archive, NOW)
    assert again.written == {first: 201}
