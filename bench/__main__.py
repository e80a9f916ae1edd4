"""`python -m bench`: measure the recorder against a fake exchange on 127.0.0.1.

Every part runs in this one command so that each figure sits next to its reference,
measured minutes apart on the same machine: on a noisy machine the absolute numbers
move, the ratios hold. Prints a table and writes every figure to a JSON file.

With --database-url postgresql+psycopg://... (or --postgres, a private cluster started
for the run) the drain and service parts store into fresh databases of that PostgreSQL
server, with plain COPY as the drain's reference; the other parts keep SQLite files.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bench import report
from bench.burst import measure_burst
from bench.database import SQLITE, Databases
from bench.depth import DEPTH_PARTS, FULL_DEPTH, QUICK_DEPTH, measure_depth
from bench.drain import measure_drain
from bench.ingest import measure_ingest
from bench.legacy import measure_legacy
from bench.market import FULL_MARKET, QUICK_MARKET, MarketSize, measure_market
from bench.replay import FULL_REPLAY, QUICK_REPLAY, measure_replay
from bench.service import measure_service
from worker.ops.local_postgres import PostgresError, PostgresServer, check_server, start_private_server
from worker.settings import Settings

DEFAULT_PARTS = ("ingest", "drain", "service", "burst", "legacy", "depth", "depth_usdm", "replay")
PARTS = (*DEFAULT_PARTS, "market")
"""`market` (bench/market.py) runs only when named: 10 minutes at 40,000 msg/s and then
the search for the highest sustained rate, 20 minutes or more, would triple a full run."""
DATABASE_PARTS = ("drain", "service")
"""The parts that follow --database-url; the others always store into SQLite files."""
DEFAULT_OUTPUT = Path(__file__).parent / "results" / "latest.json"
POLLED = {
    "sqlite": "polling the SQLite file every 10 ms (new rows by rowid)",
    "postgresql": "polling the PostgreSQL database every 10 ms or as fast as a poll returns (new ids per symbol)",
}
LATENCY_METHOD = (
    "latency = time a row is first seen by {polled} (an upper bound of its commit) - the row's "
    "event_time, stamped by the fake exchange when it emits the event (same clock)"
)


@dataclass(frozen=True)
class Sizes:
    """How much each part measures: --quick for the test suite, the default for figures."""

    ingest_frames: int
    ingest_rounds: int
    drain_frames: int
    drain_rounds: int
    legacy_seconds: float
    warmup_seconds: float
    scale_symbols: int
    burst_frames: int


QUICK = Sizes(
    ingest_frames=200_000,
    ingest_rounds=2,
    drain_frames=20_000,
    drain_rounds=2,
    legacy_seconds=2,
    warmup_seconds=2,
    scale_symbols=768,
    burst_frames=20_000,
)
FULL = Sizes(
    ingest_frames=300_000,
    ingest_rounds=5,
    drain_frames=200_000,
    drain_rounds=5,
    legacy_seconds=10,
    warmup_seconds=10,
    scale_symbols=1536,
    burst_frames=100_000,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds per part (for the test suite)")
    parser.add_argument(
        "--duration", type=float, help="seconds of the end-to-end and memory run (default 120; 5 with --quick)"
    )
    parser.add_argument("--scale-duration", type=float, help="seconds of the scale run (default 60; 5 with --quick)")
    parser.add_argument(
        "--drain-interval",
        type=float,
        default=Settings.drain_interval_seconds,
        help="DRAIN_INTERVAL_SECONDS of the service under test (default %(default)s)",
    )
    parser.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default %(default)s)",
    )
    market = parser.add_argument_group("the market part (--parts market; SQLite only)")
    market.add_argument(
        "--market-duration",
        type=float,
        help=f"seconds of the measured window (default {FULL_MARKET.seconds:g}; {QUICK_MARKET.seconds:g} with --quick)",
    )
    market.add_argument(
        "--market-rate",
        type=float,
        help=f"messages per second in all (default {FULL_MARKET.rate:g}; {QUICK_MARKET.rate:g} with --quick)",
    )
    market.add_argument(
        "--market-symbols",
        type=int,
        help=f"symbols listed and recorded (default {FULL_MARKET.symbols}; {QUICK_MARKET.symbols} with --quick)",
    )
    market.add_argument(
        "--find-max",
        action=argparse.BooleanOptionalAction,
        help=(
            "afterwards, the highest rate sustained without a growing backlog, in steps of "
            f"{FULL_MARKET.step:g} msg/s of {FULL_MARKET.step_seconds:g} s each (default: on; off with --quick)"
        ),
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file (default %(default)s)")
    database = parser.add_mutually_exclusive_group()
    database.add_argument(
        "--database-url",
        help=(
            f"a PostgreSQL server (postgresql+psycopg://user@host:port/db) for the {' and '.join(DATABASE_PARTS)} "
            "parts: each round creates a fresh database there (CREATE DATABASE; the user needs CREATEDB) and drops "
            "it afterwards. Default: SQLite files"
        ),
    )
    database.add_argument(
        "--postgres",
        action="store_true",
        help="start a private PostgreSQL cluster (initdb, default settings) for the run and use it as --database-url",
    )
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    for name, value in (("--market-duration", args.market_duration), ("--market-rate", args.market_rate)):
        if value is not None and not value > 0:
            parser.error(f"{name} must be a number > 0, not {value:g}")
    if args.market_symbols is not None and args.market_symbols < 1:
        parser.error(f"--market-symbols must be at least 1, not {args.market_symbols}")
    if args.find_max is None:
        args.find_max = not args.quick
    if args.duration is None:
        args.duration = 5.0 if args.quick else 120.0
    if args.scale_duration is None:
        args.scale_duration = 5.0 if args.quick else 60.0
    return args


def run(args: argparse.Namespace, workdir: Path, databases: Databases | None = None) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    parts = args.parts.split(",")
    databases = databases or Databases()
    results: dict[str, Any] = {"meta": {**_meta(args), "database": databases.backend}}
    if "ingest" in parts:
        _progress("ingest: recorder vs bare receive loop against the blast server")
        results["ingest"] = measure_ingest(workdir, sizes.ingest_frames, sizes.ingest_rounds)
    if "drain" in parts:
        reference = "executemany" if databases.backend == SQLITE else "COPY"
        _progress(f"drain: Drainer vs plain {reference} ({databases.label})")
        results["drain"] = measure_drain(
            workdir, sizes.drain_frames, sizes.drain_rounds, Settings.drain_batch_size, databases
        )
    if "service" in parts:
        _progress(
            f"service: end to end, memory ({args.duration:g} s) and scale ({args.scale_duration:g} s)"
            f" ({databases.label})"
        )
        results.update(
            measure_service(
                workdir,
                args.duration,
                sizes.warmup_seconds,
                args.scale_duration,
                sizes.scale_symbols,
                args.drain_interval,
                databases,
            )
        )
        results["end_to_end"]["method"] = LATENCY_METHOD.format(polled=POLLED[databases.backend])
    if "burst" in parts:
        _progress(f"burst: {sizes.burst_frames:,} frames at once on one subscription vs the bare receive loop")
        results["burst"] = measure_burst(workdir, sizes.burst_frames)
    if "legacy" in parts:
        _progress("old design: INSERT and COMMIT per message")
        results["legacy"] = measure_legacy(workdir, sizes.ingest_frames, sizes.legacy_seconds)
    for part, market in DEPTH_PARTS.items():
        if part in parts:
            _progress(f"{part}: 200 {market} symbols x depth@100ms, storage, rebuilding an hour")
            depth_sizes = QUICK_DEPTH if args.quick else FULL_DEPTH
            results[part] = measure_depth(workdir, depth_sizes, Settings.drain_batch_size, market)
    if "replay" in parts:
        replay_sizes = QUICK_REPLAY if args.quick else FULL_REPLAY
        _progress(
            f"replay: {replay_sizes.trade_frames:,} frames at max speed vs the blast server; the first frame "
            f"{replay_sizes.depth_seconds // 2} s into {replay_sizes.depth_seconds} s of 20 symbols' depth@100ms"
        )
        results["replay"] = measure_replay(workdir, replay_sizes)
    if "market" in parts:
        size = market_size(args)
        _progress(f"market: {size.symbols:,} symbols, {size.rate:,.0f} msg/s for {size.seconds:g} s (SQLite)")
        results["market"] = measure_market(workdir, size, args.drain_interval, args.find_max)
    results["targets"] = report.targets(results)
    return results


def market_size(args: argparse.Namespace) -> MarketSize:
    """--quick's or the full size, with what --market-* overrides."""
    base = QUICK_MARKET if args.quick else FULL_MARKET
    overrides = {"seconds": args.market_duration, "rate": args.market_rate, "symbols": args.market_symbols}
    return replace(base, **{name: value for name, value in overrides.items() if value is not None})


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    # A password in --database-url stays out of the results file.
    hidden = {args.database_url: _without_password(args.database_url)} if args.database_url else {}
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m bench", *(hidden.get(arg, arg) for arg in sys.argv[1:])]),
        "database_url": hidden.get(args.database_url),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.platform(),
    }


def _without_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server: PostgresServer | None = None
    try:
        if args.postgres:
            _progress("starting a private PostgreSQL cluster")
            server = start_private_server(durable=True)
            args.database_url = server.url()
        server_url = check_server(args.database_url) if args.database_url else None
        databases = Databases(server_url)
        try:
            with tempfile.TemporaryDirectory(prefix="binance-recorder-bench-") as workdir:
                results = run(args, Path(workdir), databases)
        finally:
            databases.close()
    except PostgresError as error:
        print(f"python -m bench: {error}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(report.table(results))
    print(f"\nfigures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
