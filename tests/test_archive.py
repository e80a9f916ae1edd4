"""Backfill from Binance's public data archive, layered over REST, against the fake
exchange's copy of the archive (a real process), a real Redis and a real SQLite file,
and `binance-recorder backfill` as a user runs it.

The fake trades slowly here (one trade every 20 s: 4,320 a day) from six days ago, so
a day's zip is about 100 KB and the whole module takes seconds. Its archive is wrong
on purpose (fake_binance/archive.py): the day 4 days before it started has no files,
2 days before a CHECKSUM that does not match, and yesterday's files stop at 18:00.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from tests.conftest import clean_env, wait_until
from tests.test_cli import cli
from tests.test_fake_exchange import running_fake
from worker.exchange.archive import BinanceArchive, LayeredBackfill, parse_rows
from worker.exchange.audit import audit_day, audit_wanted_streams
from worker.exchange.history import series_for
from worker.exchange.rest import BinanceRest
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_stack import CELERY, LocalStack
from worker.settings import Settings
from worker.store.storage import NOT_RECEIVED, TABLES, audits, create_schema, make_engine

DAY = 86_400_000
PER_DAY = 4320  # --trades-per-second 0.05
TRUNCATED_ROWS = PER_DAY * 18 // 24
MIDNIGHT_MARGIN_SECONDS = 120


def utc_today() -> date:
    return datetime.now(tz=UTC).date()


def clear_of_midnight() -> None:
    """The fake counts its wrong days back from the day it starts and the tests name
    days relative to today: neither may straddle midnight UTC, so a run that starts in
    the last two minutes of a day waits for the next one."""
    seconds_into_day = time.time() % 86_400
    if seconds_into_day > 86_400 - MIDNIGHT_MARGIN_SECONDS:
        today = utc_today()
        wait_until(lambda: utc_today() != today, timeout=MIDNIGHT_MARGIN_SECONDS + 5, what="the next UTC day")


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Redis and the fake exchange (REST and archive) only: backfill needs no worker."""
    clear_of_midnight()
    directory = tmp_path_factory.mktemp("archive") / "data"
    stack = LocalStack(directory, env=clean_env({"DATABASE_URL": f"sqlite:///{directory}/binance.db"}))
    stack.start_redis()
    genesis = int(time.time() * 1000) - 6 * DAY
    stack.start_fake_exchange(["--genesis-ms", str(genesis), "--trades-per-second", "0.05"])
    yield stack
    stack.stop()


def day_back(days: int) -> date:
    return utc_today() - timedelta(days=days)


def day_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1000


def archive_get(stack: LocalStack, path: str) -> requests.Response:
    return requests.get(f"{stack.env['BINANCE_ARCHIVE_URL']}/data/spot/{path}", timeout=10)


def rest_trades(stack: LocalStack, symbol: str, first_id: int, last_id: int) -> list[dict[str, Any]]:
    """The fake's REST trades first_id..last_id, page by page."""
    rows: list[dict[str, Any]] = []
    while first_id + len(rows) <= last_id:
        page = requests.get(
            f"{stack.env['BINANCE_REST_URL']}/api/v3/historicalTrades",
            params={"symbol": symbol, "fromId": first_id + len(rows), "limit": 1000},
            timeout=10,
        ).json()
        assert page, "REST has fewer trades than asked for"
        rows.extend(page)
    return [r for r in rows if r["id"] <= last_id]


def day_trade_count(stack: LocalStack, symbol: str, day: date) -> int:
    params = {"symbol": symbol, "interval": "1d", "startTime": day_ms(day), "limit": 1}
    kline = requests.get(f"{stack.env['BINANCE_REST_URL']}/api/v3/klines", params=params, timeout=10).json()[0]
    return int(kline[8])


def zip_lines(response: requests.Response) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return archive.read(archive.namelist()[0]).decode().splitlines()


def test_the_fakes_archive_serves_rest_trades_as_binance_lays_them_out(exchange: LocalStack) -> None:
    day = day_back(3)
    path = f"daily/trades/BTCUSDT/BTCUSDT-trades-{day}.zip"
    response, checksum = archive_get(exchange, path), archive_get(exchange, f"{path}.CHECKSUM")

    assert response.status_code == 200 and checksum.status_code == 200
    assert checksum.text == f"{hashlib.sha256(response.content).hexdigest()}  BTCUSDT-trades-{day}.zip"
    lines = zip_lines(response)
    assert len(lines) == PER_DAY == day_trade_count(exchange, "BTCUSDT", day)
    fields = [line.split(",") for line in lines]
    first, last = int(fields[0][0]), int(fields[-1][0])
    assert [int(f[0]) for f in fields] == list(range(first, last + 1))
    # Microseconds, as spot files since 2025; everything else as REST says it.
    assert fields == [
        [str(t["id"]), t["price"], t["qty"], t["quoteQty"], str(t["time"] * 1000), str(t["isBuyerMaker"]), "True"]
        for t in rest_trades(exchange, "BTCUSDT", first, last)
    ]
    assert day_ms(day) * 1000 <= int(fields[0][4]) and int(fields[-1][4]) < (day_ms(day) + DAY) * 1000


def test_the_fakes_archive_is_wrong_on_three_days_and_lacks_today(exchange: LocalStack) -> None:
    def name(days: int, kind: str = "trades") -> str:
        return f"daily/{kind}/BTCUSDT/BTCUSDT-{kind}-{day_back(days)}.zip"

    assert archive_get(exchange, name(4)).status_code == 404  # the missing day
    assert archive_get(exchange, f"{name(4)}.CHECKSUM").status_code == 404
    assert archive_get(exchange, name(0)).status_code == 404  # not closed yet
    bad = archive_get(exchange, name(2))
    assert hashlib.sha256(bad.content).hexdigest() != archive_get(exchange, f"{name(2)}.CHECKSUM").text.split()[0]
    truncated = zip_lines(archive_get(exchange, name(1, "aggTrades")))
    assert len(truncated) == TRUNCATED_ROWS < day_trade_count(exchange, "BTCUSDT", day_back(1))
    assert int(truncated[-1].split(",")[5]) < (day_ms(day_back(1)) + 18 * 3_600_000) * 1000
    kline = archive_get(exchange, f"daily/klines/BTCUSDT/1h/BTCUSDT-1h-{day_back(3)}.zip")
    assert len(zip_lines(kline)) == 24


def test_backfill_takes_closed_days_from_the_archive_and_the_rest_from_rest(exchange: LocalStack) -> None:
    done = cli(exchange, "backfill", "BTCUSDT", "trade", "--start", "-3d", "--end", "now")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    days = {line.split()[0]: line for line in lines[:-1]}
    assert list(days) == [str(day_back(k)) for k in (3, 2, 1, 0)]
    assert days[str(day_back(3))].split()[1] == "archive"  # the part of it within the range
    assert days[str(day_back(2))].split()[1:4] == ["rest", str(PER_DAY), "rows"]
    assert "checksum mismatch" in days[str(day_back(2))]
    assert f"{PER_DAY} rows = {TRUNCATED_ROWS} + {PER_DAY - TRUNCATED_ROWS}" in days[str(day_back(1))]
    assert days[str(day_back(1))].split()[1] == "archive+rest"
    assert "day not closed yet" in days[str(day_back(0))]
    assert "BTCUSDT trade: 100%" in done.stderr

    engine = make_engine(exchange.env["DATABASE_URL"])
    trades = TABLES["trades"]
    with engine.connect() as conn:
        stored = conn.execute(
            select(trades.c.trade_id, trades.c.price, trades.c.qty, trades.c.trade_time, trades.c.buyer_is_maker)
            .where(trades.c.symbol == "BTCUSDT")
            .order_by(trades.c.trade_id)
        ).all()
    first, last = stored[0][0], stored[-1][0]
    truth = rest_trades(exchange, "BTCUSDT", first, last)
    assert [tuple(row) for row in stored] == [
        (t["id"], float(t["price"]), float(t["qty"]), t["time"], t["isBuyerMaker"]) for t in truth
    ]  # consecutive ids, every value as REST has it
    assert f"rows={len(stored)}" in lines[-1]
    assert 3 * PER_DAY - 10 < len(stored) <= 3 * PER_DAY + 1


def count_rows(engine: Engine, table: str, symbol: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(TABLES[table].c.symbol == symbol)).scalar_one())


@pytest.mark.parametrize(
    ("kind", "table", "per_day"), [("aggTrade", "agg_trades", PER_DAY), ("kline_1h", "klines", 24)]
)
def test_six_days_over_every_kind_of_archive_hole_leave_no_gap(
    exchange: LocalStack, tmp_path: Path, kind: str, table: str, per_day: int
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/six.db")
    create_schema(engine)
    series = series_for("ETHUSDT", kind)
    backfill = LayeredBackfill(
        engine, BinanceRest(exchange.env["BINANCE_REST_URL"]), BinanceArchive(exchange.env["BINANCE_ARCHIVE_URL"], 10)
    )
    start, end = day_ms(day_back(5)), day_ms(day_back(0))

    reports = {r.day: r for r in backfill.run(series, start, end, "auto")}

    assert [(day, r.source) for day, r in reports.items()] == [
        (str(day_back(5)), "archive"),
        (str(day_back(4)), "rest"),
        (str(day_back(3)), "archive"),
        (str(day_back(2)), "rest"),
        (str(day_back(1)), "archive+rest"),
    ]
    assert reports[str(day_back(4))].note == "archive: not in the archive"
    assert (reports[str(day_back(1))].archive_rows, reports[str(day_back(1))].rest_rows) == (
        per_day * 18 // 24,
        per_day * 6 // 24,
    )
    key, step = TABLES[table].c[series.key_column], series.step
    with engine.connect() as conn:
        keys = [k for (k,) in conn.execute(select(key).order_by(key))]
    assert keys == list(range(keys[0], keys[0] + 5 * per_day * step, step))  # consecutive, five whole days
    again = backfill.run(series, start, end, "auto")  # idempotent: the same rows, stored once
    assert sum(r.rows for r in again) == 5 * per_day == count_rows(engine, table, "ETHUSDT")


def test_archive_only_refuses_bad_days_and_asks_rest_nothing(exchange: LocalStack, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/only.db")
    create_schema(engine)
    rest = BinanceRest(exchange.env["BINANCE_REST_URL"])
    before = requests.get(f"{exchange.env['BINANCE_REST_URL']}/fake/stats", timeout=5).json()["rest"]["requests"]
    backfill = LayeredBackfill(engine, rest, BinanceArchive(exchange.env["BINANCE_ARCHIVE_URL"], 10))

    reports = backfill.run(series_for("BNBUSDT", "trade"), day_ms(day_back(4)), day_ms(day_back(1)), "archive")

    assert [(r.source, r.rows) for r in reports] == [("none", 0), ("archive", PER_DAY), ("none", 0)]
    assert "checksum mismatch" in reports[2].note
    assert (
        requests.get(f"{exchange.env['BINANCE_REST_URL']}/fake/stats", timeout=5).json()["rest"]["requests"] == before
    )
    assert count_rows(engine, "trades", "BNBUSDT") == PER_DAY


def test_archive_rows_sniff_a_header_and_take_microseconds_or_milliseconds() -> None:
    trades = series_for("BTCUSDT", "trade")
    spot_2025 = "1,60000.1,0.5,30000.05,1735689600123456,True,True\n"
    futures = "id,price,qty,quote_qty,time,is_buyer_maker\n2,60000.2,0.25,15000.05,1704067200123,false\n"
    assert list(parse_rows(trades, io.StringIO(spot_2025))) == [
        ("BTCUSDT", 1, 60000.1, 0.5, 1735689600123, True, None, *NOT_RECEIVED)
    ]
    assert list(parse_rows(trades, io.StringIO(futures + "\n"))) == [
        ("BTCUSDT", 2, 60000.2, 0.25, 1704067200123, False, None, *NOT_RECEIVED)
    ]
    klines = series_for("BTCUSDT", "kline_1m")
    row = next(parse_rows(klines, io.StringIO("1735689600000000,1,2,0.5,1.5,10,1735689659999999,15,7,4,6,0\n")))
    assert (row[2], row[3], row[10], row[15]) == (1735689600000, 1735689659999, 7, True)


@pytest.mark.parametrize(
    ("kind", "source", "message"),
    [
        ("trade", "ftp", "invalid choice: 'ftp'"),
        ("trade", "rest", "'trade' cannot be backfilled by time"),
        ("kline_1w", "archive", "the archive has no daily files of kline_1w"),
    ],
)
def test_backfill_refuses_bad_sources_in_one_line(exchange: LocalStack, kind: str, source: str, message: str) -> None:
    done = cli(exchange, "backfill", "BTCUSDT", kind, "--start", "-1d", "--source", source)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def audit_rows(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        query = select(audits.c.symbol, audits.c.kind, audits.c.day, audits.c.verdict, audits.c.wrong)
        return [tuple(row) for row in conn.execute(query.order_by(audits.c.day, audits.c.kind))]


def test_audit_of_the_truncated_day_says_the_archive_was_wrong(exchange: LocalStack) -> None:
    day = day_back(1)
    filled = cli(exchange, "backfill", "SOLUSDT", "trade", "--start", str(day), "--end", str(day_back(0)))
    assert filled.returncode == 0, filled.stderr

    done = cli(exchange, "audit", "SOLUSDT", "--day", "-1d", "--kinds", "trade")

    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"SOLUSDT trade {day}: differs (archive wrong); rows: REST {PER_DAY}, recorded {PER_DAY}, "
        f"archive {TRUNCATED_ROWS}, 1d kline trades {PER_DAY}"
    )
    assert f"  archive covers {TRUNCATED_ROWS} trades, the 1d kline counts {PER_DAY}" in lines
    assert any(line.startswith(f"  archive lacks {PER_DAY - TRUNCATED_ROWS} trade ids: ") for line in lines)
    assert not any("recording" in line for line in lines)
    engine = make_engine(exchange.env["DATABASE_URL"])
    assert ("SOLUSDT", "trade", str(day), "differs", "archive") in audit_rows(engine)
    status = cli(exchange, "status")
    assert any(
        line.split()[:5] == ["SOLUSDT", "trade", str(day), "differs", "archive"] for line in status.stdout.splitlines()
    )


def test_audit_verifies_a_good_day_and_then_finds_what_went_wrong_in_the_recording(
    exchange: LocalStack, tmp_path: Path
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/audit.db")
    create_schema(engine)
    rest = BinanceRest(exchange.env["BINANCE_REST_URL"])
    archive = BinanceArchive(exchange.env["BINANCE_ARCHIVE_URL"], 10)
    day = day_back(3)
    LayeredBackfill(engine, rest, archive).run(
        series_for("XRPUSDT", "aggTrade"), day_ms(day), day_ms(day) + DAY, "auto"
    )

    good = audit_day(engine, rest, archive, "XRPUSDT", "aggTrade", day)
    assert (good.verdict, good.wrong, good.rest_rows, good.recorded_rows, good.archive_rows) == (
        "verified",
        "",
        PER_DAY,
        PER_DAY,
        PER_DAY,
    )
    table = TABLES["agg_trades"]
    with engine.begin() as conn:
        first = conn.execute(select(func.min(table.c.agg_id))).scalar_one()
        conn.execute(table.delete().where(table.c.agg_id == first + 10))
        conn.execute(table.update().where(table.c.agg_id == first + 20).values(price=1.5))

    bad = audit_day(engine, rest, archive, "XRPUSDT", "aggTrade", day)

    assert (bad.verdict, bad.wrong, bad.recorded_rows) == ("differs", "recording", PER_DAY - 1)
    assert f"recording lacks 1 aggregate trade ids: {first + 10}" in bad.details
    assert any(line.startswith(f"recording differs at agg_id {first + 20}: price 1.5 (REST ") for line in bad.details)
    assert audit_rows(engine) == [("XRPUSDT", "aggTrade", str(day), "differs", "recording")]  # the latest only


def ensure_worker(stack: LocalStack) -> None:
    """One worker of the default queue, started by the first test that needs it."""
    if not any(process.name == "worker" for process in stack.processes):
        stack.spawn("worker", [*CELERY, "worker", "-Q", "celery", "-c", "1", "-n", "default@%h", "-l", "INFO"])
        stack.wait_for_workers(["worker"])


def test_backfill_on_a_worker_reports_its_days(exchange: LocalStack) -> None:
    """`backfill --worker`: the task (Flower shows it) runs the layered backfill and
    its result carries the day lines the CLI prints."""
    ensure_worker(exchange)
    start, end = str(day_back(4)), str(day_back(2))

    done = cli(exchange, "backfill", "DOGEUSDT", "aggTrade", "--start", start, "--end", end, "--worker")

    assert done.returncode == 0, done.stderr
    assert "sent; waiting for a worker" in done.stderr
    days = [line.split()[:4] for line in done.stdout.splitlines()[:-1]]
    assert days == [[start, "rest", str(PER_DAY), "rows"], [str(day_back(3)), "archive", str(PER_DAY), "rows"]]
    assert "source=auto" in done.stdout and f"rows={2 * PER_DAY}" in done.stdout


def test_a_whole_closed_month_comes_from_the_monthly_file() -> None:
    """One download for the month instead of one a day; each day still checked by its count."""
    clear_of_midnight()
    this_month = utc_today().replace(day=1)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    no_defects = ["--archive-missing-day", "0", "--archive-bad-checksum-day", "0", "--archive-truncated-day", "0"]
    genesis = str(day_ms(last_month) - DAY)
    with running_fake("--genesis-ms", genesis, "--trades-per-second", "0.01", *no_defects) as fake:
        base = f"http://127.0.0.1:{fake.port}"
        engine = make_engine("sqlite://")
        create_schema(engine)
        backfill = LayeredBackfill(engine, BinanceRest(base), BinanceArchive(base, 10))

        reports = backfill.run(series_for("LTCUSDT", "trade"), day_ms(last_month), day_ms(this_month), "auto")

    days = (this_month - last_month).days
    assert [(r.source, r.rows, r.note) for r in reports] == [("archive", 864, "from the month's file")] * days
    trades = TABLES["trades"]
    with engine.connect() as conn:
        ids = [i for (i,) in conn.execute(select(trades.c.trade_id).order_by(trades.c.trade_id))]
    assert ids == list(range(ids[0], ids[0] + days * 864))


def test_the_periodic_audit_takes_recorded_days_the_archive_has_once(exchange: LocalStack, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/beat.db")
    create_schema(engine)
    settings = Settings.from_env({**exchange.env, "REDIS_PREFIX": "audit-test", "AUDIT_LOOKBACK_DAYS": "4"})
    client = redis.Redis.from_url(settings.redis_url)
    group = Group(id="g-audit", streams=("adausdt@trade", "adausdt@aggTrade"))
    GroupRegistry(client, RedisKeys("audit-test")).want(group)
    rest = BinanceRest(settings.binance_rest_url)
    trades = series_for("ADAUSDT", "trade")
    LayeredBackfill(engine, rest, BinanceArchive.from_settings(settings)).run(
        trades, day_ms(day_back(4)), day_ms(day_back(0)), "auto"
    )  # four recorded days of trades, none of aggregate trades

    first = audit_wanted_streams(settings, client, engine)
    again = audit_wanted_streams(settings, client, engine)

    # The day the archive lacks waits for it; aggregate trades were not recorded.
    assert [line.split(":")[0] for line in first["audited"]] == [f"ADAUSDT trade {day_back(k)}" for k in (3, 2, 1)]
    assert audit_rows(engine) == [
        ("ADAUSDT", "trade", str(day_back(3)), "verified", ""),
        ("ADAUSDT", "trade", str(day_back(2)), "archive_missing", ""),
        ("ADAUSDT", "trade", str(day_back(1)), "differs", "archive"),
    ]
    assert again == {"audited": []}


@pytest.mark.parametrize(("enabled", "scheduled"), [("true", True), ("false", False)])
def test_audit_enabled_puts_the_audit_on_beats_schedule(enabled: str, scheduled: bool) -> None:
    probe = "import celeryconfig; print('tasks.audit' in [e['task'] for e in celeryconfig.beat_schedule.values()])"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=clean_env({"AUDIT_ENABLED": enabled}), capture_output=True, text=True
    )
    assert done.stdout.strip() == str(scheduled), done.stderr


def test_a_shell_beside_a_run_takes_the_archive_url_from_its_stack_record(exchange: LocalStack) -> None:
    """`binance-recorder run` records its URLs in data/stack.json; a command run in the
    same directory, with none of them in its environment, reaches the run's fake archive."""
    exchange.record()
    day = day_back(3)
    command = ["backfill", "TRXUSDT", "kline_1h", "--start", str(day), "--end", str(day_back(2)), "--source", "archive"]
    done = subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *command],
        env=clean_env(),
        cwd=exchange.data_dir.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:3] == [str(day), "archive", "24"]


def test_the_task_reports_each_day_in_its_progress_for_flower(exchange: LocalStack) -> None:
    """Every state the task stores is also published by Celery's Redis backend on the
    result's key, so subscribing first sees each PROGRESS meta Flower would show."""
    ensure_worker(exchange)
    task_id = str(uuid.uuid4())
    updates = redis.Redis.from_url(exchange.env["REDIS_URL"]).pubsub()
    updates.subscribe(f"celery-task-meta-{task_id}")
    start, end = day_ms(day_back(4)), day_ms(day_back(2))
    kwargs = {"symbol": "BNBUSDT", "kind": "aggTrade", "start": start, "end": end, "source": "auto"}
    client_app(exchange.env["REDIS_URL"]).send_task("tasks.backfill", kwargs=kwargs, task_id=task_id)
    states: list[dict[str, Any]] = []

    def finished() -> bool:
        message = updates.get_message(timeout=0.5)
        if message and message["type"] == "message":
            states.append(json.loads(message["data"]))
        return bool(states) and states[-1]["status"] in ("SUCCESS", "FAILURE")

    wait_until(finished, timeout=60, what="the backfill task to finish")

    assert states[-1]["status"] == "SUCCESS", states[-1]
    progress = [state["result"] for state in states if state["status"] == "PROGRESS"]
    assert [(p["done"], p["total"], p["rows"], len(p["days"])) for p in progress] == [
        (DAY, 2 * DAY, PER_DAY, 1),
        (2 * DAY, 2 * DAY, 2 * PER_DAY, 2),
    ]
    assert [line.split()[:3] for line in progress[-1]["days"]] == [
        [str(day_back(4)), "rest", str(PER_DAY)],
        [str(day_back(3)), "archive", str(PER_DAY)],
    ]


def test_klines_longer_than_a_day_come_from_rest_under_auto(exchange: LocalStack) -> None:
    done = cli(exchange, "backfill", "ETHUSDT", "kline_1w", "--start", "-20d", "--end", "now")
    assert done.returncode == 0, done.stderr
    assert "complete=True" in done.stdout and "source=" not in done.stdout  # REST's resumable job
