"""The chaos test: abrupt drops at random moments, serverShutdown, a short "24 h",
a SIGKILLed streams worker replaced by a new one — and afterwards, once backfill has
run, every trade and aggregate-trade id the fake produced in the window is stored
exactly once, and no group ever had more than one live connection beyond a rotation.

Seeds come from CHAOS_SEEDS (comma-separated; default one seed) so the test can be
repeated with others: `CHAOS_SEEDS=1,2,3 scripts/test tests/test_chaos.py`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from tests.conftest import call, fake_stats, launch_stack, stored_ids, wait_until
from worker.store.storage import make_engine

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
SEEDS = [int(seed) for seed in os.environ.get("CHAOS_SEEDS", "7").split(",")]


@pytest.mark.parametrize("seed", SEEDS)
def test_after_chaos_and_backfill_every_id_is_stored_exactly_once(tmp_path: Path, seed: int) -> None:
    stack = launch_stack(
        tmp_path / "chaos",
        fake_args=[
            "--trades-per-second",
            "20",
            "--chaos-drop-every",
            "2.5",
            "--chaos-seed",
            str(seed),
            "--max-connection-seconds",
            "8",
        ],
        env={"CONNECTION_MAX_AGE_SECONDS": "5", "BACKFILL_INTERVAL_SECONDS": "2", "RECONNECT_BACKOFF_MAX_SECONDS": "2"},
        stream_concurrency=2,
    )
    try:
        db = make_engine(stack.env["DATABASE_URL"])
        call(stack, "tasks.subscribe", SYMBOLS, streams=["trade", "aggTrade"])
        wait_until(lambda: fake_stats(stack)["connections"]["open"] >= 1, 20, "the first connection")
        control_url = f"{stack.env['BINANCE_REST_URL']}/fake/control"
        for second in range(24):
            time.sleep(1)
            if second in (4, 15):
                requests.post(control_url, json={"action": "server_shutdown"}, timeout=5).raise_for_status()
            if second == 9:
                stack.stop_process(stack.process("worker-streams"), signal.SIGKILL)
                stack.start_stream_worker(2, name="worker-streams-2")

        stats = fake_stats(stack)
        window = {
            (symbol, kind): (stats["sent"][symbol][kind]["first"], stats["sent"][symbol][kind]["last"])
            for symbol in SYMBOLS
            for kind in ("trade", "aggTrade")
        }
        for (symbol, kind), (first, last) in window.items():
            expected = (last - first + 1, last - first + 1)
            wait_until(
                lambda: stored_ids(db, kind, symbol, first, last) == expected,  # noqa: B023 (awaited here)
                90,
                f"{symbol} {kind} ids {first}..{last} stored exactly once (seed {seed})",
            )

        connections = fake_stats(stack)["connections"]
        assert connections["dropped_by_chaos"] >= 3
        assert max(connections["max_open_per_streamset"].values()) <= 2
        with db.connect() as conn:
            filled = conn.execute(text("select count(*) from gaps where status = 'filled'")).scalar()
        assert filled and filled > 0  # the chaos made real holes, and backfill closed them
    finally:
        stack.stop()
