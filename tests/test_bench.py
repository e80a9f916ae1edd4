"""The benchmark runs end to end (`python -m bench --quick`) and reports every part.

Timing targets are not asserted here: a loaded CI machine would make them flaky, and
the benchmark's own table says whether they are met. What is asserted is that every
section is there with sane, positive figures, and that the scale run lost nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from bench import drain_market, report
from bench.frames import MARKET_RATE, MARKET_SYMBOLS, market_frames, wire_payloads
from bench.receivers import LIBRARIES
from bench.watch import NotReady, open_row_watcher
from fake_binance.listing import LoadPlan
from worker.ops.local_postgres import PostgresServer, connect
from worker.ops.local_stack import free_port
from worker.replay.wire import websocket_wire
from worker.store.storage import create_schema, make_engine

QUICK_TIMEOUT_SECONDS = 300
PROJECT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("bench") / "latest.json"
    done = run_bench("--quick", "--output", str(output))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "part" in done.stdout and str(output) in done.stdout  # the table and where the figures are
    return json.loads(output.read_text())


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_SECONDS,
        check=False,
    )


def test_every_part_reports_positive_figures(results: dict[str, Any]) -> None:
    assert results["meta"]["quick"] is True
    ingest = results["ingest"]
    assert ingest["recorder_frames_per_second"] > 0 and ingest["bare_loop_frames_per_second"] > 0
    # The recorder receives with picows, the reference loop with websocket-client (16 times
    # its CPU a frame): 4.8 in a full run (docs/performance.md); past 20 the timing is wrong.
    assert 0 < ingest["ratio"] < 20
    drain = results["drain"]
    assert drain["database"] == "sqlite" and drain["reference"] == "executemany"
    assert drain["drainer_rows_per_second"] > 0 and drain["executemany_rows_per_second"] > 0
    assert 0 < drain["ratio"] < 2
    assert "executemany (SQLite)" in results["targets"]["drain"]["what"]
    legacy = results["legacy"]
    assert legacy["sustainable_messages_per_second"] > 0
    assert legacy["at_target"]["stored_messages_per_second"] > 0
    assert legacy["at_target"]["latency"]["samples"] > 0


def test_latency_is_measured_from_event_to_commit(results: dict[str, Any]) -> None:
    e2e = results["end_to_end"]
    assert e2e["offered_messages_per_second"] == 5000 and e2e["drain_interval_seconds"] > 0
    assert e2e["samples"] > 0
    assert 0 < e2e["p50_ms"] <= e2e["p99_ms"] <= e2e["max_ms"] < 60_000
    assert "event_time" in e2e["method"]


def test_a_burst_is_timed_against_the_bare_loop_in_the_same_run(results: dict[str, Any]) -> None:
    burst = results["burst"]
    assert burst["frames"] > 0 and burst["recorder_seconds"] > 0 and burst["bare_loop_seconds"] > 0
    assert burst["ratio"] == pytest.approx(burst["recorder_seconds"] / burst["bare_loop_seconds"])


def test_the_drain_cpu_is_measured_idle_and_loaded(results: dict[str, Any]) -> None:
    cpu = results["drain_cpu"]
    assert cpu["idle"]["seconds"] > 0 and cpu["loaded"]["seconds"] > 0
    assert cpu["idle"]["cpu_share"] >= 0 and cpu["loaded"]["cpu_share"] > 0
    assert cpu["loaded"]["offered_messages_per_second"] == 5000


def test_memory_of_the_subscription_task_and_the_drain_is_sampled(results: dict[str, Any]) -> None:
    for role in ("subscription_task", "drain"):
        processes = results["memory"][role]["processes"]
        assert processes, role
        for process in processes:
            assert process["start_kb"] > 0 and process["end_kb"] > 0 and process["max_kb"] >= process["end_kb"]


def test_scale_run_holds_a_1024_stream_connection_and_loses_nothing(results: dict[str, Any]) -> None:
    scale = results["scale"]
    assert 1024 in scale["streams_per_group"] and len(scale["streams_per_group"]) >= 2
    assert scale["latency"]["samples"] > 0
    ids = scale["ids"]
    assert ids["lost_nothing"], ids
    assert ids["ids_sent"] > 0 and ids["missing"] == ids["extra"] == ids["duplicates"] == 0


def test_every_target_has_a_verdict(results: dict[str, Any]) -> None:
    assert set(results["targets"]) == {
        "ingest", "drain", "end_to_end", "memory", "scale_latency", "scale_ids", "burst",
        "depth_capacity", "depth_latency", "depth_rebuild",
        "depth_usdm_capacity", "depth_usdm_latency", "depth_usdm_rebuild",
        "replay_throughput", "replay_first_frame",
    }  # fmt: skip
    assert all(isinstance(verdict["met"], bool) for verdict in results["targets"].values())


@pytest.mark.parametrize(("part", "table"), [("depth", "depth_updates"), ("depth_usdm", "usdm_depth_updates")])
def test_depth_parts_report_drain_latency_storage_and_rebuild(results: dict[str, Any], part: str, table: str) -> None:
    """Spot's books and USDⓈ-M's (events with `pu`, stored in usdm_depth_updates and
    rebuilt by `pu`): the same figures, side by side in the table."""
    depth = results[part]
    assert depth["table"] == table and depth["symbols"] == 200
    assert depth["drain_capacity"]["rows_per_second"] > 0
    sustained = depth["sustained"]
    assert 1000 < sustained["offered_events_per_second"] <= 2100
    assert 0 < sustained["latency"]["p50_ms"] <= sustained["latency"]["p99_ms"] < 60_000
    storage = depth["storage"]
    assert 0 < storage["packed_bytes_per_symbol_hour"] < storage["json_bytes_per_symbol_hour"]
    assert depth["rebuild"]["book_at_seconds"] > 0 and depth["rebuild"]["events"] == 3600
    assert {f"{part}_capacity", f"{part}_latency", f"{part}_rebuild"} <= set(results["targets"])
    rows = [line for line in report.table(results).splitlines() if f"bytes per symbol-hour of {table} " in line]
    assert len(rows) == 1 and rows[0].split("  ")[0] == f"7 {part.replace('_', ' ')}", rows


def test_the_replay_is_measured_against_the_blast_server_and_from_the_middle_of_its_books(
    results: dict[str, Any],
) -> None:
    """Part 9 (--quick: 20,000 trade frames, two minutes of 20 symbols' depth@100ms):
    every frame came, both sides of the ratio were measured, the first frame was timed."""
    throughput = results["replay"]["throughput"]
    assert throughput["frames_per_round"] == 20_000 and throughput["streams"] == 20
    assert throughput["blast_frames_per_second"] > 0 and throughput["replay_frames_per_second"] > 0
    assert throughput["replay_cpu_us_per_frame"] > 0
    assert throughput["ratio"] == pytest.approx(
        throughput["replay_frames_per_second"] / throughput["blast_frames_per_second"]
    )
    first = results["replay"]["first_frame"]
    assert first["database"]["diffs"] == 120 * 10 * 20 and first["database"]["snapshots"] == 40
    assert first["start_after_hour_start_seconds"] == 60 and first["frames"] == 5_000
    assert first["imports_seconds"] > 0 and first["command_to_listening_seconds"] > 0
    assert first["connect_to_first_frame_seconds"] > 0 and first["depth_frames_per_second"] > 0
    assert first["books_seconds"] > 0 and first["book_levels"] > 0  # every book was answered, none empty
    verdict = results["targets"]["replay_first_frame"]
    seconds = first["command_to_listening_seconds"] + first["connect_to_first_frame_seconds"]
    assert verdict["value"] == pytest.approx(seconds - first["imports_seconds"]) and verdict["target"] == "<= 2"
    assert results["targets"]["replay_throughput"]["target"] == ">= 0.5"


@pytest.fixture(scope="module")
def postgres_drain(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer
) -> tuple[dict[str, Any], str]:
    """`--parts drain` against the session's PostgreSQL server: (the figures, the table)."""
    output = tmp_path_factory.mktemp("bench-pg") / "latest.json"
    done = run_bench("--quick", "--parts", "drain", "--database-url", postgres_server.url(), "--output", str(output))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(output.read_text()), done.stdout


def test_the_drain_on_postgresql_is_measured_against_plain_copy(postgres_drain: tuple[dict[str, Any], str]) -> None:
    results, table = postgres_drain
    assert results["meta"]["database"] == "postgresql"
    drain = results["drain"]
    assert drain["database"] == "postgresql" and drain["reference"] == "copy"
    assert drain["rows_per_round"] == 20_000 and drain["rounds"] == 2
    assert len(drain["per_round"]["drainer"]) == len(drain["per_round"]["copy"]) == 2
    assert drain["drainer_rows_per_second"] > 0 and drain["copy_rows_per_second"] > 0
    assert 0 < drain["ratio"] < 2
    verdict = results["targets"]["drain"]
    assert verdict["target"] == ">= 0.5" and "COPY (PostgreSQL)" in verdict["what"]
    assert set(results) == {"meta", "drain", "targets"}
    drain_row = next(line for line in table.splitlines() if line.startswith("2 drain"))
    assert "PostgreSQL" in drain_row and "COPY" in drain_row and "executemany" not in drain_row


def test_the_postgresql_run_drops_the_databases_it_made(
    postgres_drain: tuple[dict[str, Any], str], postgres_server: PostgresServer
) -> None:
    with connect(postgres_server.url()) as conn:
        names = [row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall()]
    assert not [name for name in names if name.startswith("bench_")], names


def test_an_unreachable_database_url_is_one_line_not_a_traceback() -> None:
    done = run_bench("--parts", "drain", "--database-url", f"postgresql+psycopg://recorder@127.0.0.1:{free_port()}/x")
    assert done.returncode == 2
    assert done.stderr.startswith("python -m bench: cannot connect to PostgreSQL at 127.0.0.1:")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    not_postgres = run_bench("--parts", "drain", "--database-url", "sqlite:///elsewhere.db")
    assert not_postgres.returncode == 2 and "not a PostgreSQL URL" in not_postgres.stderr


def test_the_drain_target_depends_on_the_database() -> None:
    def verdict(database: str, reference: str, ratio: float) -> dict[str, Any]:
        return report.targets({"drain": {"database": database, "reference": reference, "ratio": ratio}})["drain"]

    assert verdict("sqlite", "executemany", 0.47)["met"] is True
    assert verdict("postgresql", "copy", 0.47)["met"] is False
    assert verdict("postgresql", "copy", 0.52)["met"] is True
    assert verdict("sqlite", "executemany", 0.44)["met"] is False


def test_the_postgresql_watcher_sees_each_new_row_of_its_symbols_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    with pytest.raises(NotReady):  # no tables yet
        open_row_watcher(url, ["AAAUSDT"])
    engine = make_engine(url)
    create_schema(engine)

    def add(symbol: str, first: int, last: int, event_time: int) -> None:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO trades SELECT :s, i, 1.0, 1.0, CAST(:t AS bigint), false, CAST(:t AS bigint), "
                    "CAST(:t AS bigint) + 5 FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS i"
                ),
                {"s": symbol, "a": first, "b": last, "t": event_time},
            )

    add("AAAUSDT", 1, 10, 1_000)  # before the watcher: not new
    watcher = open_row_watcher(url, ["AAAUSDT", "BBBUSDT"])
    try:
        assert watcher.new_latencies() == []
        add("AAAUSDT", 11, 13, 2_000)
        add("BBBUSDT", 1, 2, 3_000)
        add("CCCUSDT", 1, 4, 3_000)  # not watched
        latencies = watcher.new_latencies()
        assert len(latencies) == 5 and all(latency > 0 for latency in latencies)
        assert sorted(watcher.receive_lags) == [5] * 5
        assert watcher.new_latencies() == []
        add("BBBUSDT", 3, 3, 4_000)
        assert len(watcher.new_latencies()) == 1
    finally:
        watcher.close()
        engine.dispose()


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """`--parts market --quick --find-max`: 300 symbols x 4 kinds (two groups) at 2,000
    msg/s, then two steps of the search: (the figures, the table)."""
    output = tmp_path_factory.mktemp("bench-market") / "latest.json"
    done = run_bench("--parts", "market", "--quick", "--find-max", "--output", str(output))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(output.read_text()), done.stdout


@pytest.mark.slow
def test_the_market_part_records_every_kind_of_every_symbol_and_loses_no_id(
    market: tuple[dict[str, Any], str],
) -> None:
    results, table = market
    figures = results["market"]
    assert (figures["symbols"], figures["streams"], figures["groups"]) == (300, 1200, 2)
    assert figures["kinds"] == ["trade", "aggTrade", "bookTicker", "depth@100ms"]
    assert 0.5 < figures["top_10_share"] < 1 and 1000 < figures["offered_messages_per_second"] < 3000
    for kind, latency in figures["latency"].items():
        assert latency["samples"] > 0, kind
        assert 0 <= latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"] < 60_000
        assert latency["from"] == ("receive" if kind == "bookTicker" else "event")
    ids = figures["ids"]
    assert ids["ids_sent"] > 0 and ids["streams_checked"] > 300
    assert ids["missing"] == ids["duplicates"] == ids["extra"] == 0
    assert isinstance(figures["book_continuity_breaks"], int) and figures["book_continuity_breaks"] >= 0
    cpu = figures["cpu_cores"]
    assert set(cpu) == {
        "streams processes", "drain (default worker)", "redis", "beat", "fake exchange", "benchmark (the watcher)",
    }  # fmt: skip
    assert cpu["streams processes"] > 0 and cpu["fake exchange"] > 0
    roles = [track["role"] for track in figures["memory"]]
    assert roles.count("streams process") == 1
    assert {"redis-server", "beat process", "fake exchange process"} <= set(roles)
    assert len(figures["memory"][0]["processes"]) == 2  # one process per group
    assert all(p["start_kb"] > 0 and p["end_kb"] > 0 for track in figures["memory"] for p in track["processes"])
    for table_name in ("trades", "agg_trades", "book_tickers", "depth_updates"):
        stored = figures["storage"][table_name]
        assert stored["bytes_per_hour"] > 0 and stored["rows_per_hour"] > 0 and stored["bytes_per_row"] > 20
    search = figures["find_max"]
    assert 1 <= len(search["steps"]) <= 2 and search["highest_sustained_messages_per_second"] in (0, 1000, 2000)
    assert {"market_ids", "market_memory", "market_latency_trade", "market_latency_depth@100ms"} <= set(
        results["targets"]
    )
    assert results["targets"]["market_ids"]["met"] is True
    assert "8 market" in table and "highest rate without a growing backlog" in table


def test_bad_market_options_are_one_line_errors() -> None:
    done = run_bench("--parts", "market", "--market-rate", "0")
    assert done.returncode == 2 and "--market-rate must be a number > 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_websocket_libraries_are_measured_side_by_side_on_the_market_mix(tmp_path: Path) -> None:
    """`--parts clients --quick`: every library's bare loop receives every frame of the
    same blast server, with its rate and CPU against websocket-client's in the same round."""
    output = tmp_path / "latest.json"
    done = run_bench("--parts", "clients", "--quick", "--output", str(output))
    assert done.returncode == 0, done.stdout + done.stderr
    clients = json.loads(output.read_text())["clients"]
    assert clients["mix"] == "market" and clients["reference"] == "websocket-client"
    libraries = clients["libraries"]
    assert list(libraries) == list(LIBRARIES)
    for name, figures in libraries.items():
        assert figures["frames_per_second"] > 0 and figures["cpu_seconds_per_million_frames"] > 0, name
        assert len(figures["per_round"]["frames_per_second"]) == clients["rounds"]
    assert libraries["websocket-client"]["rate_ratio"] == libraries["websocket-client"]["cpu_ratio"] == 1.0
    assert all(f"{name} bare loop, market mix" in done.stdout for name in LIBRARIES)


def test_the_market_mix_frames_are_the_load_tests_kinds_in_its_proportions() -> None:
    frames = market_frames(40_000)  # a second of the mix
    kinds = Counter(orjson.loads(frame)["stream"].partition("@")[2] for frame in frames)
    plan = LoadPlan.build(MARKET_SYMBOLS, MARKET_RATE)
    for kind, rates in plan.rates.items():
        assert kinds[kind] == pytest.approx(sum(rates), rel=0.2), kind
    symbols = Counter(orjson.loads(frame)["data"]["s"] for frame in frames)
    assert symbols.most_common(1)[0][0] == "BTCUSDT" and len(symbols) > 1000  # skewed, yet most symbols speak


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536])
def test_wire_payloads_reads_back_what_websocket_wire_wrote(size: int) -> None:
    payloads = [b"x" * size, b'{"a":1}', b"y" * size]
    assert wire_payloads(websocket_wire(payloads)) == payloads


def test_the_in_process_drain_at_the_market_mix_stores_one_row_a_frame_of_its_measured_rounds() -> None:
    figures = drain_market.measure(frames_count=6000, round_frames=1000, warmup_frames=2000)
    assert (figures["rows"], figures["rounds"]) == (4000, 4)  # the rounds after the warm-up's two
    assert figures["cpu_us_per_row"] > 0 and figures["books"] > 0 and figures["book_states_read_ms"] > 0


def test_bad_in_process_drain_options_are_one_line_errors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.drain_market", "--round-frames", "0"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 2 and "--round-frames must be 1 to 30,000" in done.stderr
    assert "Traceback" not in done.stderr
