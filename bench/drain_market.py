"""The drain at the whole market's mix, in process: CPU per stored row by round size.

The real `Drainer.store_round` (claim, parse, store into a fresh SQLite file, follow the
books, acknowledge) over `bench/frames.py`'s `market_frames` (1,500 symbols, trade,
aggTrade, bookTicker and depth@100ms, Zipf-skewed), dealt by symbol to six lists as the
market's six groups would push them (a clock mark every 250 frames). Each round first
pushes `--round-frames` frames, as the groups' flushes land while the deployed drain
works, then stores one round; so a round holds what the drain finds when it takes
rounds that often. Every book gets a depth snapshot that its first event continues, so
the books are synced once the first rounds have followed them, as in the steady state;
the first `--warmup-frames` frames (the books' syncing) are not measured.

Reported: process CPU seconds (`time.process_time`: this process only, not Redis) per
stored row, rows per second of wall time, the Redis server's CPU over the measured
rounds (the pushes included), and then the CPU of `tasks.snapshot_books`' read of every
followed book's state (`recorded_states`), which beat runs every second.

    .venv/bin/python -m bench.drain_market --frames 300000 --round-frames 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import orjson
import redis

from bench.frames import GENESIS_MS, market_frames
from bench.procs import cpu_seconds, service_env
from worker.buffer import FrameBuffer, clock_mark
from worker.exchange.snapshots import recorded_states
from worker.groups import Group, GroupRegistry
from worker.keys import RedisKeys
from worker.ops.local_stack import LocalStack
from worker.store.depth import snapshot_row
from worker.store.drain import Drainer, DrainReport
from worker.store.storage import create_schema, make_engine, store_rows
from worker.streams import SPOT

GROUPS = 6
FRAMES_PER_FLUSH = 250
KINDS = ("trade", "aggTrade", "bookTicker", "depth@100ms")


def symbol_of(frame: bytes) -> str:
    stream = orjson.loads(frame)["stream"]
    return str(stream).partition("@")[0]


def first_update_ids(frames: list[bytes]) -> dict[str, int]:
    """Each book's first diff-depth event's `U`: a snapshot at it is continued by that event."""
    first: dict[str, int] = {}
    for frame in frames:
        if b"@depth" in frame:
            data = orjson.loads(frame)["data"]
            first.setdefault(data["s"], data["U"])
    return first


def measure(frames_count: int, round_frames: int, warmup_frames: int) -> dict[str, float]:
    frames = market_frames(frames_count)
    symbols = [symbol_of(frame) for frame in frames]
    group_of = {symbol: index % GROUPS for index, symbol in enumerate(sorted(set(symbols)))}
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp), env=service_env()) as stack:
        client = redis.Redis.from_url(stack.start_redis())
        redis_pid = int(client.info("server")["process_id"])
        keys = RedisKeys("bench")
        lists = []
        for group in range(GROUPS):
            streams = tuple(f"{s}@{kind}" for s, g in group_of.items() if g == group for kind in KINDS)
            GroupRegistry(client, keys).want(Group(f"g{group}", streams))
            lists.append(FrameBuffer(client, keys).register(f"g{group}"))
        engine = make_engine(f"sqlite:///{tmp}/market.db")
        create_schema(engine)
        with engine.begin() as conn:
            snapshots = [
                snapshot_row(symbol, {"lastUpdateId": first, "bids": [["1", "1"]], "asks": [["2", "1"]]}, GENESIS_MS)
                for symbol, first in first_update_ids(frames).items()
            ]
            store_rows(conn, {"depth_snapshots": snapshots})
        drainer = Drainer(client, keys, engine, batch_size=5000)
        report, cpu, wall, redis_cpu, rounds = DrainReport(), 0.0, 0.0, 0.0, 0
        for number, start in enumerate(range(0, frames_count, round_frames)):
            if start == warmup_frames // round_frames * round_frames:
                report, cpu, wall, redis_cpu, rounds = DrainReport(), 0.0, 0.0, 0.0, 0
            rounds += 1
            dealt: list[list[bytes]] = [[] for _ in range(GROUPS)]
            for frame, symbol in zip(
                frames[start : start + round_frames], symbols[start : start + round_frames], strict=True
            ):
                dealt[group_of[symbol]].append(frame)
            redis_before = cpu_seconds([redis_pid])
            with client.pipeline(transaction=False) as pipe:
                for key, elements in zip(lists, dealt, strict=True):
                    for at in range(0, len(elements), FRAMES_PER_FLUSH):
                        pipe.rpush(key, clock_mark(GENESIS_MS + 50 * number), *elements[at : at + FRAMES_PER_FLUSH])
                pipe.execute()
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            drainer.store_round(report, lists)
            cpu += time.process_time() - cpu_before
            wall += time.perf_counter() - wall_before
            redis_cpu += cpu_seconds([redis_pid]) - redis_before
        if any(client.llen(key) for key in lists):
            raise RuntimeError("a round left frames behind: raise --round-frames' batches (5,000 a list)")
        engine.dispose()
        books, tick_ms = len(recorded_states(client, keys, SPOT)), _book_states_read_ms(client, keys)
    rows = sum(report.rows.values())
    return {
        "rows": rows,
        "rounds": rounds,
        "cpu_us_per_row": cpu / rows * 1e6,
        "rows_per_second": rows / wall,
        "redis_cpu_us_per_row": redis_cpu / rows * 1e6,
        "books": books,
        "book_states_read_ms": tick_ms,
    }


def _book_states_read_ms(client: redis.Redis, keys: RedisKeys, reads: int = 20) -> float:
    """CPU milliseconds of `tasks.snapshot_books`' read of every book's state (`recorded_states`),
    once a second, with the books the drain followed."""
    started = time.process_time()
    for _ in range(reads):
        recorded_states(client, keys, SPOT)
    return (time.process_time() - started) / reads * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drain_market", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=300_000, help="frames of the market's mix (default 300,000)")
    parser.add_argument("--round-frames", type=int, default=2000, help="frames pushed before each round")
    parser.add_argument("--warmup-frames", type=int, default=100_000, help="frames not measured (the books' sync)")
    args = parser.parse_args()
    if not 0 < args.round_frames <= 5000 * GROUPS or not 0 <= args.warmup_frames < args.frames:
        parser.error("--round-frames must be 1 to 30,000 and --warmup-frames below --frames")
    figures = measure(args.frames, args.round_frames, args.warmup_frames)
    print(
        f"rounds of {args.round_frames:,} frames: {figures['rows']:,.0f} rows in {figures['rounds']:.0f} rounds, "
        f"{figures['cpu_us_per_row']:.1f} us of CPU a row, {figures['rows_per_second']:,.0f} rows/s, "
        f"Redis {figures['redis_cpu_us_per_row']:.1f} us a row; reading the states of "
        f"{figures['books']:,} books (snapshot_books, every second): {figures['book_states_read_ms']:.1f} ms of CPU"
    )


if __name__ == "__main__":
    main()
