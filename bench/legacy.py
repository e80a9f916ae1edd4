"""Part 6: the design this project replaces, measured by the same benchmark.

One process reads the websocket and writes every message to SQLite directly: parse,
one INSERT, one COMMIT per message, sqlite3's default settings (see
`receivers.legacy`). Two measurements:

- sustainable rate: against the blast server, as many messages as it can take in
  `seconds` (the recorder's ingest figure is the number to hold it against);
- at 5,000 msg/s: against the fake exchange (10 symbols x 250 trades/s x trade and
  aggTrade), its latency from the exchange's event time to its commit, and how many
  messages the exchange had produced that it had not stored when it stopped. Those
  sit in socket buffers and the exchange's send queue: they are lost when the
  process stops, and Binance drops a connection that falls that far behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.figures import latency_summary
from bench.frames import STREAMS, TARGET_RATE
from bench.procs import module_command, run_json, service_env, spawn_and_wait
from worker.ops.local_stack import LocalStack

_CHILD_SLACK_SECONDS = 60.0


def measure_legacy(workdir: Path, blast_frames: int, seconds: float) -> dict[str, Any]:
    directory = workdir / "legacy"
    with LocalStack(directory, env=service_env()) as stack:
        blast_url = spawn_and_wait(
            stack, "blast", module_command("bench.blast", "--frames", blast_frames), r"blast listening on (ws://\S+)"
        ).group(1)
        flat_out = _legacy(stack, f"{blast_url}/stream", directory / "legacy-blast.db", seconds, blast_frames)
        per_symbol = TARGET_RATE / len(STREAMS)  # trades/s of each symbol, one message per stream
        rest_url = stack.start_fake_exchange(["--trades-per-second", str(per_symbol)])
        ws_url = f"{rest_url.replace('http://', 'ws://')}/stream?streams={'/'.join(STREAMS)}"
        paced = _legacy(stack, ws_url, directory / "legacy-paced.db", seconds, rest_url=rest_url)
    return {
        "method": "per message: json.loads, INSERT, COMMIT; sqlite3 defaults (rollback journal, fsync per commit)",
        "sustainable_messages_per_second": flat_out["frames"] / flat_out["seconds"],
        "at_target": {
            "offered_messages_per_second": TARGET_RATE,
            "seconds": paced["seconds"],
            "stored_messages_per_second": paced["frames"] / paced["seconds"],
            "latency": latency_summary(paced["latencies_ms"]),
            "lag_at_stop_ms": paced["latencies_ms"][-1] if paced["latencies_ms"] else None,
            "behind_at_stop_messages": paced["behind"],
        },
    }


def _legacy(
    stack: LocalStack, url: str, db: Path, seconds: float, frames: int | None = None, rest_url: str | None = None
) -> dict[str, Any]:
    args: list[object] = ["legacy", "--url", url, "--db", db, "--seconds", seconds]
    if frames is not None:
        args += ["--frames", frames]
    if rest_url is not None:
        args += ["--rest-url", rest_url]
    return run_json(module_command("bench.receivers", *args), stack.env, seconds + _CHILD_SLACK_SECONDS)
