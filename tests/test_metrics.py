"""The Prometheus exporter (`binance-recorder metrics`), scraped over HTTP.

Against a real stack recording on the fake exchange (trades and order books, then every
connection dropped): the figures are there with the values the stack's own state has.
Against a real Redis and database with the real drain: rows, dead letters, backlog and
lag, gaps and REST weight come out as counted. Then `binance-recorder run` serves it,
and the Grafana dashboard asks only for metrics a real scrape has.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine

from tests.conftest import call, clean_env, launch_stack, wait_until
from tests.test_drain import push, trade_frame
from worker.buffer import FrameBuffer, FrameWriter
from worker.exchange.ratelimit import FUTURES_POOL, MINUTE_MS, RedisLimitState
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.local_stack import LocalStack, free_port
from worker.ops.metrics import RecorderCollector
from worker.settings import Settings
from worker.store.drain import Drainer
from worker.store.storage import gaps, make_engine
from worker.times import now_ms

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "binance-recorder.json"
SYMBOLS = ["BTCUSDT", "ETHUSDT"]

Labels = tuple[tuple[str, str], ...]


class Scrape:
    """A parsed /metrics page: metric families by name, samples by name and labels."""

    def __init__(self, page: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(page)}
        self.samples: dict[str, dict[Labels, float]] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())))

    def by(self, name: str, label: str) -> dict[str, float]:
        """The samples of `name` by the value of one of their labels."""
        return {dict(key)[label]: value for key, value in self.samples.get(name, {}).items()}

    def exported_names(self) -> set[str]:
        """Every name a query may use: the samples', and the families' (a family with no
        sample now, such as gaps before the first one, is still exported)."""
        names = set(self.samples)
        for family in self.families.values():
            names.add(family.name)
            if family.type == "counter":
                names.add(f"{family.name}_total")
        return names


def scrape(url: str) -> Scrape:
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(response.text)


def collect(settings: Settings, client: redis.Redis, engine: Engine) -> Scrape:
    """One scrape of the collector without the HTTP server, for the tests on their own Redis."""
    registry = CollectorRegistry()
    registry.register(RecorderCollector(settings, client, engine))
    return Scrape(generate_latest(registry).decode())


# -- a real stack ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, str]]:
    stack = launch_stack(tmp_path_factory.mktemp("metrics"), env={"BACKFILL_INTERVAL_SECONDS": "2"})
    try:
        url = stack.start_metrics(free_port())
        yield stack, url
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def recording(stack: tuple[LocalStack, str]) -> tuple[LocalStack, str, str]:
    """The stack recording trades and books of two symbols in one group, both books synced."""
    local, url = stack
    subscribed = call(local, "tasks.subscribe", SYMBOLS, ["trade", "depth"])
    (group,) = subscribed["groups"]

    def ready() -> bool:
        page = scrape(url)
        return (page.value("binance_recorder_group_messages_total", group=group) or 0) > 0 and all(
            page.value("binance_recorder_book_synced", market="spot", symbol=symbol) == 1 for symbol in SYMBOLS
        )

    wait_until(ready, 60, "messages counted and both books synced in /metrics")
    return local, url, group


def database(local: LocalStack) -> Engine:
    return make_engine(local.env["DATABASE_URL"])


def test_the_scrape_shows_the_recording_groups_figures(recording: tuple[LocalStack, str, str]) -> None:
    local, url, group = recording
    wait_until(
        lambda: (scrape(url).value("binance_recorder_group_messages_per_second", group=group) or 0) > 0, 30, "a rate"
    )
    page = scrape(url)
    status = call(local, "tasks.status")
    (recorded,) = [g for g in status["groups"] if g["id"] == group]

    assert page.value("binance_recorder_redis_up") == 1 and page.value("binance_recorder_database_up") == 1
    assert page.value("binance_recorder_group_info", group=group, symbols=",".join(SYMBOLS)) == 1
    assert page.value("binance_recorder_group_up", group=group) == 1
    assert page.value("binance_recorder_group_state", group=group, state="connected") == 1
    assert page.value("binance_recorder_group_streams", group=group) == 4
    # Read a moment before the task's own record: never more than it, and not far behind.
    messages = page.value("binance_recorder_group_messages_total", group=group)
    assert messages is not None and 0 < messages <= recorded["messages"]
    assert page.value("binance_recorder_group_messages_per_second", group=group) > 0  # type: ignore[operator]
    assert page.value("binance_recorder_group_reconnects_total", group=group) == 0
    assert 0 <= page.value("binance_recorder_group_last_message_age_seconds", group=group) < 5  # type: ignore[operator]

    backlog = page.by("binance_recorder_buffer_backlog", "group")
    assert group in backlog and backlog[group] >= 0
    assert 0 <= page.by("binance_recorder_buffer_oldest_frame_age_seconds", "group")[group] < 10

    assert page.value("binance_recorder_frames_drained_total") > 0  # type: ignore[operator]
    assert page.value("binance_recorder_rows_stored_total", table="trades") > 0  # type: ignore[operator]
    assert page.value("binance_recorder_rows_stored_total", table="depth_updates") > 0  # type: ignore[operator]
    assert page.value("binance_recorder_drain_lanes") == 1 and page.value("binance_recorder_drain_lanes_held") == 1
    assert page.value("binance_recorder_storage_failing") == 0
    assert page.value("binance_recorder_dead_letters_total") == 0
    assert 0 <= page.value("binance_recorder_table_newest_row_age_seconds", table="trades") < 10  # type: ignore[operator]

    books = page.samples["binance_recorder_books"]
    assert {labels: count for labels, count in books.items() if count} == {(("market", "spot"), ("state", "synced")): 2}
    assert page.value("binance_recorder_books", market="usdm", state="resyncing") == 0  # every market, even unused
    rate = page.value("binance_recorder_book_updates_per_second", market="spot", symbol="BTCUSDT")
    assert rate is not None and rate > 0
    assert page.by("binance_recorder_books_sync_remaining_seconds", "market") == {"spot": 0}  # all synced
    used = page.value("binance_recorder_rest_weight_used", pool="spot")
    assert used is not None and 0 <= used <= page.value("binance_recorder_rest_weight_budget", pool="spot") == 3000
    assert page.value("binance_recorder_rest_weight_budget", pool="futures") == 1200
    assert page.value("binance_recorder_rest_blocked_seconds", pool="spot") == 0
    assert page.value("binance_recorder_redis_memory_used_bytes") > 2**16  # type: ignore[operator]
    assert page.value("binance_recorder_redis_memory_max_bytes") == 0  # the local stack sets no maxmemory
    assert 0 < page.value("binance_recorder_scrape_duration_seconds") < 1  # type: ignore[operator]


def test_dropped_connections_show_as_reconnects_and_depth_gaps(recording: tuple[LocalStack, str, str]) -> None:
    local, url, group = recording
    requests.post(f"{local.env['BINANCE_REST_URL']}/fake/control", json={"action": "drop_all"}, timeout=5)

    def after_the_drop() -> Scrape | None:
        page = scrape(url)
        reconnected = (page.value("binance_recorder_group_reconnects_total", group=group) or 0) >= 1
        depth_gaps = page.value("binance_recorder_gaps", kind="depth", status="unfillable") or 0
        return page if reconnected and depth_gaps >= len(SYMBOLS) else None

    page = wait_until(after_the_drop, 60, "a reconnect and a depth gap per book in /metrics")
    with database(local).connect() as conn:
        in_the_table = dict(conn.execute(text("select kind, count(*) from gaps group by kind")).all())
    assert page.by("binance_recorder_gaps", "kind").keys() <= in_the_table.keys()
    assert page.value("binance_recorder_gaps", kind="depth", status="unfillable") == in_the_table["depth"]


def test_the_dashboard_asks_only_for_exported_metrics(recording: tuple[LocalStack, str, str]) -> None:
    _, url, _ = recording
    exported = scrape(url).exported_names()
    used = dashboard_metric_names()
    assert used, "the dashboard queries no metric"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    ours = {name for name in exported if name.startswith("binance_recorder_")}
    assert len(used) >= 20, f"the dashboard shows few figures: {sorted(used)} of {sorted(ours)}"


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: its identifiers less strings, label
    matchers, ranges, grouping labels, function names, keywords and numbers."""
    bare = re.sub(
        r'"[^"]*"|\{[^}]*\}|\[[^]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', " ", expr
    )
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", bare))
    return words - PROMQL_WORDS


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {name for expr in dashboard_expressions(dashboard) for name in metric_names(expr)}


def test_the_metric_names_of_an_expression_are_read_right() -> None:
    """The reader the dashboard test relies on, on an expression with every kind of word."""
    expr = (
        'sum by (group) (rate(a_total{kind="x", le="0.5"}[5m] offset 1m)) / on(group) group_left(symbols) '
        "b_info > bool 0 or max without (table) (c:recorded) unless d"
    )
    assert metric_names(expr) == {"a_total", "b_info", "c:recorded", "d"}
    nested = {"panels": [{"targets": [{"expr": "x"}]}, {"panels": [{"targets": [{"expr": "y"}]}]}]}
    assert dashboard_expressions(nested) == ["x", "y"]


# -- a real Redis and database, with the real drain ------------------------------------------


def settings_for(keys: RedisKeys) -> Settings:
    return Settings.from_env({"REDIS_PREFIX": keys.prefix})


def test_drained_rows_dead_letters_backlog_and_lag(redis_client: redis.Redis, keys: RedisKeys, engine: Engine) -> None:
    settings = settings_for(keys)
    key = push(redis_client, keys, "g1", [trade_frame("BTCUSDT", 1), b"{not json", trade_frame("BTCUSDT", 2)])
    GroupRegistry(redis_client, keys).want(Group(id="g2", streams=("ethusdt@trade",)))
    FrameBuffer(redis_client, keys).register("g2")
    writer = FrameWriter(redis_client, keys, "g2", max_pending=100, max_list_length=1000)
    writer.pending.extend([trade_frame("ETHUSDT", 1)])
    pushed_at = now_ms()
    writer.flush()

    before = collect(settings, redis_client, engine)
    assert before.by("binance_recorder_buffer_backlog", "list") == {key: 4, keys.frames("g2"): 2}
    ages = before.by("binance_recorder_buffer_oldest_frame_age_seconds", "group")
    assert ages["g1"] > 1e6  # the clock mark `push` writes is from 2023
    assert 0 <= ages["g2"] <= (now_ms() - pushed_at) / 1000
    assert before.value("binance_recorder_rows_stored_total", table="trades") == 0

    Drainer(redis_client, keys, engine, batch_size=100).drain(time_budget=10)

    after = collect(settings, redis_client, engine)
    assert after.by("binance_recorder_buffer_backlog", "group") == {"g1": 0, "g2": 0}
    assert after.by("binance_recorder_buffer_oldest_frame_age_seconds", "group") == {"g1": 0, "g2": 0}
    assert after.value("binance_recorder_rows_stored_total", table="trades") == 3
    assert after.value("binance_recorder_frames_drained_total") == 4
    assert after.value("binance_recorder_dead_letters_total") == 1
    newest_trade_age = after.value("binance_recorder_table_newest_row_age_seconds", table="trades")
    assert newest_trade_age is not None and newest_trade_age > 1e6  # trade times of 2023

    # Stored again (a replay): no new rows, so no more counted.
    push(redis_client, keys, "g1", [trade_frame("BTCUSDT", 1)])
    Drainer(redis_client, keys, engine, batch_size=100).drain(time_budget=10)
    assert collect(settings, redis_client, engine).value("binance_recorder_rows_stored_total", table="trades") == 3


def test_gaps_by_kind_and_status(redis_client: redis.Redis, keys: RedisKeys, engine: Engine) -> None:
    found = [("trade", "open"), ("trade", "filled"), ("trade", "filled"), ("depth", "unfillable")]
    with engine.begin() as conn:
        for first, (kind, status) in enumerate(found):
            conn.execute(
                insert(gaps),
                {"symbol": "BTCUSDT", "kind": kind, "first_missing": first, "last_missing": first, "found_at": 0,
                 "status": status, "rows_fetched": 0},
            )  # fmt: skip

    page = collect(settings_for(keys), redis_client, engine)

    assert page.samples["binance_recorder_gaps"] == {
        (("kind", "depth"), ("status", "unfillable")): 1,
        (("kind", "trade"), ("status", "filled")): 2,
        (("kind", "trade"), ("status", "open")): 1,
    }


def test_rest_weight_and_a_ban_per_pool(redis_client: redis.Redis, keys: RedisKeys, engine: Engine) -> None:
    spot, futures = RedisLimitState(redis_client, keys), RedisLimitState(redis_client, keys, FUTURES_POOL)
    minute = now_ms() // MINUTE_MS
    for spent_in in (minute, minute + 1):  # the scrape may fall in the next minute
        spot.reserve(spent_in, 40, 3000)
        futures.reserve(spent_in, 25, 2400)
    spot.block("ban", now_ms() + 120_000, now_ms())

    page = collect(settings_for(keys), redis_client, engine)

    assert page.value("binance_recorder_rest_weight_used", pool="spot") == 40
    assert page.value("binance_recorder_rest_weight_used", pool="futures") == 25
    assert 110 < page.value("binance_recorder_rest_blocked_seconds", pool="spot") <= 120  # type: ignore[operator]
    assert page.value("binance_recorder_rest_blocked_seconds", pool="futures") == 0


def test_an_unreachable_redis_or_database_is_a_zero_not_a_failed_scrape(
    redis_client: redis.Redis, keys: RedisKeys, engine: Engine, tmp_path: Path
) -> None:
    away = redis.Redis(port=free_port(), socket_connect_timeout=1)
    page = collect(settings_for(keys), away, engine)
    assert page.value("binance_recorder_redis_up") == 0 and page.value("binance_recorder_database_up") == 1
    assert not any(name.startswith("binance_recorder_group") for name in page.samples)

    missing = tmp_path / "not-yet" / "binance.db"
    page = collect(settings_for(keys), redis_client, make_engine(f"sqlite:///{missing}"))
    assert page.value("binance_recorder_redis_up") == 1 and page.value("binance_recorder_database_up") == 0
    assert not missing.exists(), "a scrape must not create the database"


# -- the command ------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_taken_port_is_one_line_and_exit_2(redis_url: str, tmp_path: Path) -> None:
    env = clean_env({"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'binance.db'}"})
    stack = LocalStack(tmp_path, env=env)
    try:
        url = stack.start_metrics(free_port())
        port = url.split(":")[2].split("/")[0]
        result = cli("metrics", "--port", port, env=env)
    finally:
        stack.stop()
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and result.stderr.count("\n") == 1


def test_run_starts_the_exporter_and_prints_its_url(tmp_path: Path) -> None:
    """`binance-recorder run` as a user starts it; its metrics line is a working /metrics
    of the stack it runs, and stopping the run stops the exporter."""
    port = free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "worker.ops.cli", "run", "--exchange", "fake", "--symbols", "BTCUSDT",
         "--streams", "trade", "--data-dir", str(tmp_path / "data"), "--redis-port", str(free_port()),
         "--flower-port", "0", "--metrics-port", str(port)],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = read_until(run, "recording ")
        assert f"metrics:  http://127.0.0.1:{port}/metrics" in lines
        url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: scrape(url).by("binance_recorder_group_messages_total", "group"), 60, "messages counted")
    finally:
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=60)
    assert run.returncode == 0, output
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def read_until(process: subprocess.Popen[str], marker: str) -> str:
    """The process's output up to and including the first line starting with `marker`
    (a run that hangs silently is ended by pytest's timeout; one that exits ends the read)."""
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(marker):
            return "".join(seen)
    pytest.fail(f"no line starting {marker!r} in:\n{''.join(seen)}")
