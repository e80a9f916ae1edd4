"""The Redis lists between the network and the database.

Writers (subscription tasks) append raw frames with one RPUSH per flush; the single
reader (the drain) claims a batch from the head, stores it, and only then removes it.
Each list has a head counter (how many elements were ever removed from its head) so
that removal stays exact even if something else trimmed the head in between.

A flush is preceded by a clock mark `@<ms>`: the receive time of the frames after it,
stored as every row's `received_at` (and the only time Binance's bookTicker has), for
the price of one list element per flush instead of any work per frame. The frames of a
flush are in the order they were received, and each row also keeps its frame's place
after the mark (`received_seq`), so the receive order within one `received_at` is
kept. A batch that ends inside a flush leaves that flush's mark behind it; the
acknowledgement puts the mark back in front of the rest, with the place of the frame
it now precedes (`@<ms>:<place>`), so the mark and every frame's place survive batch
boundaries, drain runs, restarts and re-drains of the same elements.

Every flush also rings its list's doorbell (a list of at most one element) after its
frames, so an idle drain blocks on the doorbells of the lists it drains instead of
polling: it wakes as a flush lands, and costs nothing while nothing comes. One doorbell
per list, not one for all: drains running side by side (PostgreSQL's lanes) each wake
for their own lists, where a shared one would wake whichever drain popped it first.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import redis

from worker.keys import RedisKeys, as_text
from worker.streams import SPOT
from worker.times import now_ms

CLOCK_MARK_PREFIX = b"@"

# Remove `claimed` elements from the head, minus those already removed by others
# since the claim (head counter moved), so a frame is never removed unread. Then, if
# the new head is a frame (the batch ended inside a flush) and the batch's last clock
# mark is given, push that mark back in front of it, counted as -1 removed so that the
# next claim's arithmetic stays exact.
_ACK_SCRIPT = """
local head = tonumber(redis.call('HGET', KEYS[2], KEYS[1]) or '0')
local n = tonumber(ARGV[1]) - (head - tonumber(ARGV[2]))
if n > 0 then
  redis.call('LTRIM', KEYS[1], n, -1)
  redis.call('HINCRBY', KEYS[2], KEYS[1], n)
end
if ARGV[3] ~= '' then
  local first = redis.call('LINDEX', KEYS[1], 0)
  if first and string.sub(first, 1, 1) ~= '@' then
    redis.call('LPUSH', KEYS[1], ARGV[3])
    redis.call('HINCRBY', KEYS[2], KEYS[1], -1)
  end
end
return n
"""


# Cut a list back to ARGV[1] elements from its head, counting what was cut: in the
# head counter (so the drain's next ack stays exact) and as dropped frames.
_TRIM_SCRIPT = """
local excess = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  redis.call('LTRIM', KEYS[1], excess, -1)
  redis.call('HINCRBY', KEYS[2], KEYS[1], excess)
  redis.call('HINCRBY', KEYS[3], 'frames_trimmed', excess)
  redis.call('HINCRBY', KEYS[4], 'trimmed', excess)
end
return excess
"""


def clock_mark(now_ms: int, place: int = 0) -> bytes:
    """The mark of a flush received at `now_ms`: `@<ms>`; `place` > 0 (the drain's
    mark put back before the rest of a flush it cut) adds the place in the flush of
    the frame the mark stands before: `@<ms>:<place>`."""
    mark = CLOCK_MARK_PREFIX + str(now_ms).encode()
    return mark + b":" + str(place).encode() if place else mark


def parse_clock_mark(element: bytes) -> tuple[int, int]:
    """(receive time in ms, place of the next frame in its flush) of a clock mark;
    ValueError if it is garbled."""
    ms, _, place = element[1:].partition(b":")
    return int(ms), int(place) if place else 0


def ring_doorbell(pipe: redis.client.Pipeline, keys: RedisKeys, list_key: str) -> None:
    """Wake a drain waiting in `FrameBuffer.wait_for_frames` for `list_key`; one ring is
    kept, however many flushes come before it wakes."""
    doorbell = keys.doorbell(list_key)
    pipe.lpush(doorbell, 1)
    pipe.ltrim(doorbell, 0, 0)


@dataclass(frozen=True)
class Claim:
    """A batch read from the head of one list, not yet removed from it."""

    key: str
    elements: list[bytes]
    head: int


class FrameBuffer:
    """Redis-side operations on the frame lists, shared by writers and the drain."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys
        self._ack = client.register_script(_ACK_SCRIPT)

    def register(self, group_id: str, market: str = SPOT) -> str:
        """Make the drain visit this group's list (of `market`: see `RedisKeys.frames`); returns the list key."""
        key = self.keys.frames(group_id, market)
        self.client.sadd(self.keys.buffers, key)
        return key

    def list_keys(self) -> list[str]:
        return sorted(as_text(k) for k in self.client.smembers(self.keys.buffers))

    def backlog(self, key: str) -> int:
        return int(self.client.llen(key))

    def claim(self, key: str, count: int) -> Claim:
        return self.claim_many([key], count)[0]

    def claim_many(self, keys: list[str], count: int) -> list[Claim]:
        """Up to `count` elements from the head of each list, in one round trip (its reply
        parsed by hiredis: see pyproject.toml)."""
        with self.client.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.hget(self.keys.buffer_heads, key)
                pipe.lrange(key, 0, count - 1)
            replies = pipe.execute()
        return [
            Claim(key=key, elements=replies[2 * i + 1], head=int(replies[2 * i] or 0)) for i, key in enumerate(keys)
        ]

    def ack(
        self,
        claim: Claim,
        last_mark: int | None = None,
        next_place: int = 0,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Remove a stored claim from its list (queued on `pipe` if given); `last_mark`,
        the claim's last clock mark, goes back in front of a flush the claim cut in two,
        with `next_place`, the place in that flush of the first frame left.

        If the writer trimmed the list past the claim (an overflow), the mark put back is
        older than the frames now at the head: their rows get an early time, not none."""
        self._ack(
            keys=[claim.key, self.keys.buffer_heads],
            args=[len(claim.elements), claim.head, b"" if last_mark is None else clock_mark(last_mark, next_place)],
            client=pipe or self.client,
        )

    def wait_for_frames(self, list_keys: list[str], timeout_seconds: float) -> None:
        """Block until a flush into one of `list_keys` rings its doorbell (it may have
        rung since the last claim: then at once), or the timeout passes."""
        if not list_keys:
            time.sleep(timeout_seconds)
            return
        self.client.blpop([self.keys.doorbell(key) for key in list_keys], timeout=timeout_seconds)

    def forget_if_empty(self, key: str) -> None:
        """Stop visiting the list of a group that is no longer wanted, once it is empty."""
        if self.client.llen(key) == 0:
            self.client.srem(self.keys.buffers, key)
            self.client.hdel(self.keys.buffer_heads, key)
            self.client.delete(self.keys.doorbell(key))


class FrameWriter:
    """Holds received frames in memory and pushes them with one RPUSH per flush.

    Receiving threads append to `pending` (a deque: appends are thread-safe and cost
    no I/O); the owner calls `flush()` on a steady clock. If Redis is briefly
    unreachable the frames stay here, up to `max_pending`; past that the oldest are
    dropped and counted, because an unbounded buffer would only trade a gap for an
    out-of-memory kill that loses everything. Trade ids are consecutive, so a dropped
    trade is a visible gap that backfill repairs.

    The Redis list is bounded too (`max_list_length`): if the drain stops, the oldest
    frames are trimmed rather than letting Redis run out of memory and refuse writes
    for every group. Trims are counted in the status record and the service counters.

    A group records one market (`market`): its frames go to that market's list, whose
    name tells the drain which market's tables they fill.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        group_id: str,
        max_pending: int,
        max_list_length: int,
        market: str = SPOT,
    ) -> None:
        self.client = client
        self.keys = keys
        self.key = keys.frames(group_id, market)
        self.status_key = keys.status(group_id)
        self.max_pending = max_pending
        self.max_list_length = max_list_length
        self.pending: deque[bytes] = deque()
        self.dropped = 0
        self.pushed = 0
        self.last_error: str | None = None
        self._trim = client.register_script(_TRIM_SCRIPT)

    def flush(self) -> int:
        """Push pending frames; returns how many were pushed.

        A Redis error is remembered in `last_error` rather than raised: the sockets
        must go on being read while Redis is away, or Binance's data is lost anyway.
        """
        count = len(self.pending)
        if not count:
            return 0
        popleft = self.pending.popleft
        frames = [popleft() for _ in range(count)]
        received_at = now_ms()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.rpush(self.key, clock_mark(received_at), *frames)
                pipe.hincrby(self.status_key, "messages", count)
                pipe.hset(self.status_key, "last_message_at", received_at)
                ring_doorbell(pipe, self.keys, self.key)  # after the frames: a woken drain finds them
                length = pipe.execute()[0]
            if length > self.max_list_length:
                self._trim(
                    keys=[self.key, self.keys.buffer_heads, self.keys.counters, self.status_key],
                    args=[self.max_list_length],
                )
        except redis.RedisError as error:
            self.last_error = f"{type(error).__name__}: {error}"
            self.pending.extendleft(reversed(frames))
            self._shed_excess()
            return 0
        self.last_error = None
        self.pushed += count
        return count

    def _shed_excess(self) -> None:
        excess = len(self.pending) - self.max_pending
        for _ in range(max(0, excess)):
            self.pending.popleft()
        self.dropped += max(0, excess)
