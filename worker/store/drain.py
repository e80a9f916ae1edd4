"""Moves frames from the Redis lists into the database, batch by batch.

Order matters for invariant 1 (nothing acknowledged is lost): claim a batch (read, not
removed), parse it, commit it in one transaction, and only then remove it from Redis.
A drain that dies in between leaves the batch in Redis; the next drain stores it again
and the natural primary keys make that a no-op (invariant 2).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import redis
from sqlalchemy.engine import Engine

from worker.buffer import Claim, FrameBuffer
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.store.books import follow_books
from worker.store.parsing import ParsedBatch, parse_frames
from worker.store.storage import store_rows
from worker.times import now_ms

# Dead letters kept for inspection; older ones are trimmed (the counter keeps counting).
DEAD_LETTERS_KEPT = 10_000


@dataclass
class DrainReport:
    frames: int = 0
    dead_letters: int = 0
    control: int = 0
    batches: int = 0
    rows: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "dead_letters": self.dead_letters,
            "control": self.control,
            "batches": self.batches,
            "rows": dict(self.rows),
        }


class Drainer:
    def __init__(self, client: redis.Redis, keys: RedisKeys, engine: Engine, batch_size: int) -> None:
        self.client = client
        self.keys = keys
        self.engine = engine
        self.batch_size = batch_size
        self.buffer = FrameBuffer(client, keys)
        self.registry = GroupRegistry(client, keys)

    def drain(self, time_budget: float, should_stop: Callable[[], bool] = lambda: False) -> DrainReport:
        """Drain every list until it is empty, the time budget is spent, or the worker
        shuts down (between batches: a started batch is always finished)."""
        report = DrainReport()
        deadline = time.monotonic() + time_budget
        wanted = self.registry.wanted()
        for key in self.buffer.list_keys():
            while time.monotonic() < deadline and not should_stop():
                claim = self.buffer.claim(key, self.batch_size)
                if not claim.elements:
                    break
                self._store(claim, report)
                if len(claim.elements) < self.batch_size:
                    break
            gid = key.rsplit(":", 1)[-1]
            if gid not in wanted and not self.registry.has_live_lease(gid):
                self.buffer.forget_if_empty(key)
        return report

    def _store(self, claim: Claim, report: DrainReport) -> None:
        parsed = parse_frames(claim.elements)
        with self.engine.begin() as conn:
            stored = store_rows(conn, parsed.rows)
            depth_rows = parsed.rows.get("depth_updates")
            books = follow_books(conn, self.client, self.keys, depth_rows, now_ms()) if depth_rows else None
        if books is not None:
            books.save(self.client, self.keys)
        self._acknowledge(claim, parsed)
        report.batches += 1
        report.frames += parsed.frames
        report.control += parsed.control
        report.dead_letters += len(parsed.dead_letters)
        report.rows.update(stored)

    def _acknowledge(self, claim: Claim, parsed: ParsedBatch) -> None:
        """Record dead letters and counters and remove the batch, all in one transaction."""
        with self.client.pipeline(transaction=True) as pipe:
            if parsed.dead_letters:
                at = now_ms()
                pipe.rpush(
                    self.keys.dead_letters,
                    *(
                        orjson.dumps(
                            {
                                "reason": d.reason,
                                "frame": d.frame.decode(errors="replace"),
                                "at": at,
                                "buffer": claim.key,
                            }
                        )
                        for d in parsed.dead_letters
                    ),
                )
                pipe.ltrim(self.keys.dead_letters, -DEAD_LETTERS_KEPT, -1)
                pipe.hincrby(self.keys.counters, "dead_letters", len(parsed.dead_letters))
            pipe.hincrby(self.keys.counters, "frames_drained", parsed.frames)
            self.buffer.ack(claim, pipe)
            pipe.execute()
