"""Part 9, replay: `binance-recorder replay` read back as fast as a client takes it, and
how soon a replay starting in the middle of an hour of order books sends its first frame.

- throughput: the recorded trade and aggTrade frames of `bench.frames` (the blast
  server's own stream, stored through the drain's parser with a clock mark every 50 ms)
  replayed at `--speed max` on `/stream?streams=...` to the bare websocket-client loop
  of `bench.receivers`; the reference is the blast server sending the same frames,
  pre-encoded, to the same loop, each round a pair back to back (as part 1). The
  replay's CPU time per frame (its process, all threads, while the loop receives) is
  the figure a busy machine moves least;
- first frame: an hour of depth@100ms of 20 symbols (720,000 diffs, 20 levels each, a
  1,000-level snapshot per symbol at the hour's start and at its end, as the recorder's
  default DEPTH_SNAPSHOT_INTERVAL_SECONDS of an hour leaves them) replayed from the
  middle of the hour: seconds from the command's start until it listens, and from the
  client's connection to its first frame; then the depth frames/s of the following
  frames, and the 20 books at the clock (`/api/v3/depth`, rebuilt from the snapshot
  half an hour back).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.depth import DepthFeed
from bench.figures import median, paired_ratio
from bench.frames import STREAMS, trade_frames
from bench.ingest import ROUND_TIMEOUT_SECONDS, bare_loop_seconds
from bench.procs import cpu_seconds, module_command, run_json, service_env, spawn_and_wait, wait_for_log
from worker.buffer import clock_mark
from worker.ops.local_stack import LocalStack, ManagedProcess
from worker.store.depth import pack_levels
from worker.store.parsing import parse_frames
from worker.store.storage import create_schema, make_engine, store_rows

FLUSH_MS = 50
HOUR_START_MS = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000
DEPTH_SYMBOLS = 20
TICK_MS = 100
SNAPSHOT_LEVELS = 1000
LEVEL_POOL = 4096
"""Distinct level sets the diffs cycle through: building 720,000 from the generator
would take longer than the rest of the part."""
RECEIVE_LAG_MS = (4, 27)
"""A diff is received this long after its event time (then stamped with its flush's mark)."""
REPLAY_READY = r"replay: (ws://\S+) and (http://\S+)"


@dataclass(frozen=True)
class ReplaySizes:
    trade_frames: int
    rounds: int
    depth_seconds: int  # of depth@100ms recorded; the replay starts in its middle
    depth_frames: int  # received after the first, for the depth rate


QUICK_REPLAY = ReplaySizes(trade_frames=20_000, rounds=1, depth_seconds=120, depth_frames=5_000)
FULL_REPLAY = ReplaySizes(trade_frames=200_000, rounds=3, depth_seconds=3600, depth_frames=50_000)


def measure_replay(workdir: Path, sizes: ReplaySizes) -> dict[str, Any]:
    directory = workdir / "replay"
    with LocalStack(directory, env=service_env()) as stack:
        throughput = _throughput(stack, directory / "trades.db", sizes)
        first_frame = _first_frame(stack, directory / "depth.db", sizes)
    return {"throughput": throughput, "first_frame": first_frame}


# -- throughput ---------------------------------------------------------------------------


def build_trades(db: Path, frames: list[bytes]) -> tuple[int, int]:
    """The frames stored as the drain stores them, a clock mark every 50 ms of event
    time; returns the window [start, end) of their receive times."""
    elements: list[bytes] = []
    mark = None
    for frame in frames:
        event_time = int(frame.split(b'"E":', 1)[1].split(b",", 1)[0])
        flush = event_time - event_time % FLUSH_MS + FLUSH_MS
        if flush != mark:
            elements.append(clock_mark(flush))
            mark = flush
        elements.append(frame)
    batch = parse_frames(elements)
    if batch.dead_letters or sum(map(len, batch.rows.values())) != len(frames):
        raise RuntimeError(f"the parser took {batch.frames} of {len(frames)} frames: {batch.dead_letters[:1]}")
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    with engine.begin() as conn:
        store_rows(conn, batch.rows)
    engine.dispose()
    first = int(elements[0][1:])
    return first, (mark or first) + 1


def _throughput(stack: LocalStack, db: Path, sizes: ReplaySizes) -> dict[str, Any]:
    frames = sizes.trade_frames
    start, end = build_trades(db, trade_frames(frames))
    blast = spawn_and_wait(
        stack, "blast", module_command("bench.blast", "--frames", frames), r"blast listening on (ws://\S+)"
    ).group(1)
    streams = "/".join(STREAMS)
    blast_rates, replay_rates, cpu = [], [], []
    for number in range(sizes.rounds):
        blast_rates.append(frames / bare_loop_seconds(stack, blast, frames))
        replay, ws, _ = _start_replay(stack, f"replay-trades-{number}", db, start, end)
        before = cpu_seconds([replay.popen.pid])
        received = _bare(stack, f"{ws}/stream?streams={streams}", frames)
        cpu.append((cpu_seconds([replay.popen.pid]) - before) / frames * 1e6)
        stack.stop_process(replay)
        if received["frames"] != frames:
            raise RuntimeError(f"the replay sent {received['frames']} of {frames} frames")
        replay_rates.append(frames / received["seconds"])
    return {
        "frames_per_round": frames,
        "rounds": sizes.rounds,
        "streams": len(STREAMS),
        "blast_frames_per_second": median(blast_rates),
        "replay_frames_per_second": median(replay_rates),
        "ratio": paired_ratio(replay_rates, blast_rates),
        "replay_cpu_us_per_frame": median(cpu),
        "per_round": {"blast": blast_rates, "replay": replay_rates, "replay_cpu_us_per_frame": cpu},
    }


# -- first frame --------------------------------------------------------------------------


def depth_symbols() -> list[str]:
    return [f"DEP{i:02d}USDT" for i in range(1, DEPTH_SYMBOLS + 1)]


def build_depth_hour(db: Path, seconds: int) -> dict[str, Any]:
    """`seconds` of depth@100ms of 20 symbols as the recorder stores them: each tick's
    diffs (event times a few ms apart) received in the flush after them, their receive
    time that flush's clock mark; a snapshot per symbol before the first diff and after
    the last. Stored with the store layer's `store_rows`, in one transaction."""
    started = time.perf_counter()
    symbols = depth_symbols()
    feed = DepthFeed(symbols)
    pool = [(pack_levels(feed.levels("b")), pack_levels(feed.levels("a"))) for _ in range(LEVEL_POOL)]
    next_id = {symbol: 1_000_000 * (index + 1) for index, symbol in enumerate(symbols)}
    snapshots = [feed.snapshot(symbol, next_id[symbol] - 1) for symbol in symbols]
    rows: list[tuple[Any, ...]] = []
    places: Counter[int] = Counter()  # clock mark -> the next diff's place in its flush
    low, high = RECEIVE_LAG_MS
    for tick in range(seconds * 1000 // TICK_MS):
        for index, symbol in enumerate(symbols):
            event_time = HOUR_START_MS + tick * TICK_MS + index * 2
            received = event_time + low + (tick * 7 + index * 13) % (high - low)
            mark = received - received % FLUSH_MS + FLUSH_MS
            first = next_id[symbol]
            final = first + (tick + index) % 5
            next_id[symbol] = final + 1
            bids, asks = pool[(tick * DEPTH_SYMBOLS + index) % LEVEL_POOL]
            rows.append((symbol, final, first, event_time, bids, asks, mark, places[mark]))
            places[mark] += 1
    snapshots += [feed.snapshot(symbol, next_id[symbol] - 1) for symbol in symbols]
    built = time.perf_counter()
    engine = make_engine(f"sqlite:///{db}")
    create_schema(engine)
    with engine.begin() as conn:
        store_rows(conn, {"depth_snapshots": snapshots, "depth_updates": rows})
    engine.dispose()
    return {
        "diffs": len(rows),
        "snapshots": len(snapshots),
        "bytes": db.stat().st_size,
        "generate_seconds": built - started,
        "store_seconds": time.perf_counter() - built,
    }


def _first_frame(stack: LocalStack, db: Path, sizes: ReplaySizes) -> dict[str, Any]:
    database = build_depth_hour(db, sizes.depth_seconds)
    start = HOUR_START_MS + sizes.depth_seconds * 1000 // 2
    end = HOUR_START_MS + sizes.depth_seconds * 1000
    symbols = depth_symbols()
    imports = _import_seconds(stack)
    launched = time.perf_counter()
    replay, ws, http = _start_replay(stack, "replay-depth", db, start, end)
    listening = time.perf_counter() - launched
    streams = "/".join(f"{symbol.lower()}@depth@100ms" for symbol in symbols)
    received = _bare(stack, f"{ws}/stream?streams={streams}", sizes.depth_frames)
    books_started = time.perf_counter()
    books = [_book(http, symbol) for symbol in symbols]
    books_seconds = time.perf_counter() - books_started
    stack.stop_process(replay)
    return {
        "symbols": len(symbols),
        "database": database,
        "recorded_seconds": sizes.depth_seconds,
        "start_after_hour_start_seconds": (start - HOUR_START_MS) / 1000,
        "imports_seconds": imports,
        "command_to_listening_seconds": listening,
        "connect_to_first_frame_seconds": received["first_after_connect"],
        "frames": received["frames"],
        "depth_frames_per_second": received["frames"] / received["seconds"],
        "books_seconds": books_seconds,
        "book_levels": min(books),
    }


def _import_seconds(stack: LocalStack) -> float:
    """What starting the command costs before it reads anything: the interpreter and the
    modules `replay` imports, timed the same way (command started to command done), the
    least of three. On a busy machine it moves the most, whatever the recording."""
    command = [sys.executable, "-c", "import worker.ops.cli, worker.replay.server"]
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run(command, env=stack.env, capture_output=True, check=True, timeout=ROUND_TIMEOUT_SECONDS)
        runs.append(time.perf_counter() - started)
    return min(runs)


def _book(http: str, symbol: str) -> int:
    """The book at the replay clock, as a client asks for it after its first diffs: its levels a side."""
    answer = requests.get(f"{http}/api/v3/depth", params={"symbol": symbol, "limit": "1000"}, timeout=60)
    answer.raise_for_status()
    return min(len(answer.json()["bids"]), len(answer.json()["asks"]))


def _start_replay(
    stack: LocalStack, name: str, db: Path, start_ms: int, end_ms: int
) -> tuple[ManagedProcess, str, str]:
    """`binance-recorder replay --speed max` of the window, once it says its two URLs."""
    stack.env["DATABASE_URL"] = f"sqlite:///{db}"
    command = module_command(
        "worker.ops.cli", "replay", "--start", start_ms, "--end", end_ms, "--speed", "max", "--port", 0
    )
    process = stack.spawn(name, command)
    match = wait_for_log(process, re.compile(REPLAY_READY))
    return process, match.group(1), match.group(2)


def _bare(stack: LocalStack, url: str, frames: int) -> dict[str, Any]:
    return run_json(
        module_command("bench.receivers", "bare", "--url", url, "--frames", frames), stack.env, ROUND_TIMEOUT_SECONDS
    )
