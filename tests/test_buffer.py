"""The Redis buffer and the lease, against a real redis-server."""

from __future__ import annotations

import time

import redis
from redis.utils import HIREDIS_AVAILABLE

from worker.buffer import FrameBuffer, FrameWriter, clock_mark
from worker.keys import RedisKeys
from worker.lease import Lease


def test_writer_pushes_a_clock_mark_then_the_frames_in_one_flush(redis_client: redis.Redis, keys: RedisKeys) -> None:
    key = FrameBuffer(redis_client, keys).register("g1")
    writer = FrameWriter(redis_client, keys, "g1", max_pending=100, max_list_length=1000)
    writer.pending.extend([b'{"a":1}', b'{"a":2}'])

    assert writer.flush() == 2

    elements = redis_client.lrange(key, 0, -1)
    assert elements[0].startswith(b"@") and int(elements[0][1:]) > 1_600_000_000_000
    assert elements[1:] == [b'{"a":1}', b'{"a":2}']
    assert not writer.pending
    assert redis_client.hget(keys.status("g1"), "messages") == b"2"


def test_writer_keeps_frames_while_redis_is_away_and_drops_the_oldest_past_its_bound(keys: RedisKeys) -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    writer = FrameWriter(unreachable, keys, "g1", max_pending=3, max_list_length=1000)
    writer.pending.extend([b"1", b"2", b"3", b"4", b"5"])

    assert writer.flush() == 0

    assert list(writer.pending) == [b"3", b"4", b"5"]
    assert writer.dropped == 2
    assert writer.last_error and "ConnectionError" in writer.last_error


def test_a_list_past_its_bound_loses_its_oldest_frames_counted_and_the_drain_stays_exact(
    redis_client: redis.Redis, keys: RedisKeys
) -> None:
    buffer = FrameBuffer(redis_client, keys)
    key = buffer.register("g1")
    writer = FrameWriter(redis_client, keys, "g1", max_pending=100, max_list_length=5)
    writer.pending.extend([b"1", b"2", b"3"])
    writer.flush()  # [mark, 1, 2, 3]
    claim = buffer.claim(key, 2)  # the drain reads [mark, 1] ...
    writer.pending.extend([b"4", b"5", b"6"])
    writer.flush()  # [mark, 1, 2, 3, mark, 4, 5, 6] is cut to its newest 5
    buffer.ack(claim)  # ... and its ack must not remove frames it never read

    remaining = redis_client.lrange(key, 0, -1)
    assert remaining[0] == b"3" and remaining[1].startswith(b"@") and remaining[2:] == [b"4", b"5", b"6"]
    assert redis_client.hget(keys.counters, "frames_trimmed") == b"3"
    assert redis_client.hget(keys.status("g1"), "trimmed") == b"3"


def test_claim_then_ack_removes_exactly_the_claimed_elements(redis_client: redis.Redis, keys: RedisKeys) -> None:
    buffer = FrameBuffer(redis_client, keys)
    key = buffer.register("g1")
    redis_client.rpush(key, *[str(i).encode() for i in range(10)])

    claim = buffer.claim(key, 4)
    redis_client.rpush(key, b"10")  # a writer appends meanwhile
    buffer.ack(claim)

    assert claim.elements == [b"0", b"1", b"2", b"3"]
    assert redis_client.lrange(key, 0, -1) == [str(i).encode() for i in range(4, 11)]
    assert buffer.list_keys() == [key]


def test_ack_never_removes_unread_elements_when_the_head_moved_since_the_claim(
    redis_client: redis.Redis, keys: RedisKeys
) -> None:
    buffer = FrameBuffer(redis_client, keys)
    key = buffer.register("g1")
    redis_client.rpush(key, *[str(i).encode() for i in range(10)])
    claim = buffer.claim(key, 4)
    # Someone else removed 2 elements from the head and counted them.
    redis_client.ltrim(key, 2, -1)
    redis_client.hincrby(keys.buffer_heads, key, 2)

    buffer.ack(claim)

    assert redis_client.lrange(key, 0, -1) == [str(i).encode() for i in range(4, 10)]


def test_replies_are_parsed_by_hiredis() -> None:
    """A claim is one LRANGE of up to 5,000 frames: redis-py's Python parser took 2.2 us a
    frame of the drain's 11, hiredis's C parser 0.3 us (see pyproject.toml)."""
    assert HIREDIS_AVAILABLE


def test_clock_mark_format() -> None:
    assert clock_mark(1700000000123) == b"@1700000000123"


def test_lease_is_exclusive_renewable_and_released_only_by_its_holder(redis_client: redis.Redis) -> None:
    first = Lease(redis_client, "lease:g1", ttl_seconds=5, owner="a")
    second = Lease(redis_client, "lease:g1", ttl_seconds=5, owner="b")

    assert first.acquire()
    assert not second.acquire()
    assert first.renew() and not second.renew()
    second.release()  # not the holder: no effect
    assert first.holder() == first.token
    first.release()
    assert first.holder() is None
    assert second.acquire()


def test_lease_expires_when_not_renewed(redis_client: redis.Redis) -> None:
    lease = Lease(redis_client, "lease:g2", ttl_seconds=0.2)
    assert lease.acquire()
    time.sleep(0.3)
    assert Lease(redis_client, "lease:g2", ttl_seconds=5).acquire()
    assert not lease.renew()
