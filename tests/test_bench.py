"""The benchmark runs end to end (`python -m bench --quick`) and reports every part.

Timing targets are not asserted here: a loaded CI machine would make them flaky, and
the benchmark's own table says whether they are met. What is asserted is that every
section is there with sane, positive figures, and that the scale run lost nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

QUICK_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("bench") / "latest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "part" in done.stdout and str(output) in done.stdout  # the table and where the figures are
    return json.loads(output.read_text())


def test_every_part_reports_positive_figures(results: dict[str, Any]) -> None:
    assert results["meta"]["quick"] is True
    ingest = results["ingest"]
    assert ingest["recorder_frames_per_second"] > 0 and ingest["bare_loop_frames_per_second"] > 0
    assert 0 < ingest["ratio"] < 2
    drain = results["drain"]
    assert drain["drainer_rows_per_second"] > 0 and drain["executemany_rows_per_second"] > 0
    assert 0 < drain["ratio"] < 2
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
    }  # fmt: skip
    assert all(isinstance(verdict["met"], bool) for verdict in results["targets"].values())


def test_depth_part_reports_drain_latency_storage_and_rebuild(results: dict[str, Any]) -> None:
    depth = results["depth"]
    assert depth["symbols"] == 200
    assert depth["drain_capacity"]["rows_per_second"] > 0
    sustained = depth["sustained"]
    assert 1000 < sustained["offered_events_per_second"] <= 2100
    assert 0 < sustained["latency"]["p50_ms"] <= sustained["latency"]["p99_ms"] < 60_000
    storage = depth["storage"]
    assert 0 < storage["packed_bytes_per_symbol_hour"] < storage["json_bytes_per_symbol_hour"]
    assert depth["rebuild"]["book_at_seconds"] > 0 and depth["rebuild"]["events"] == 3600
    assert {"depth_capacity", "depth_latency", "depth_rebuild"} <= set(results["targets"])
