"""The pieces of fault handling on their own: the lease fence, status writes fenced by
the lease, storage failures as state, and input checks (whole-stack scenarios are in
tests/test_faults.py)."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy.exc import OperationalError

from worker.groups import GroupRegistry, InvalidSubscription, normalize_stream_kinds
from worker.ingest.fence import CLOSE_ALLOWANCE_SECONDS, LeaseFence
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.ops.status import problems
from worker.settings import Settings
from worker.store.failures import clear_storage_error, record_storage_error, storage_error


def test_the_fence_closes_once_the_lease_may_expire_and_only_once() -> None:
    closed: list[str] = []
    fence = LeaseFence(ttl_seconds=10, close_all=closed.append)
    fence.renewed(sent_at=100.0)
    deadline = 100.0 + 10 - CLOSE_ALLOWANCE_SECONDS

    fence.enforce(deadline - 0.01)
    assert closed == [] and fence.holds(deadline - 0.01)
    fence.enforce(deadline)
    fence.enforce(deadline + 5)
    assert len(closed) == 1 and "could not be renewed" in closed[0]
    assert not fence.holds(deadline + 5)

    fence.renewed(sent_at=deadline + 5)  # renewed again: connections may reopen
    assert fence.holds(deadline + 6)


def test_a_short_ttl_is_fenced_at_half_of_it() -> None:
    fence = LeaseFence(ttl_seconds=3, close_all=lambda reason: None)
    fence.renewed(sent_at=0.0)
    assert fence.holds(1.49) and not fence.holds(1.5)


def test_only_the_lease_holder_writes_the_group_status(redis_client: redis.Redis, keys: RedisKeys) -> None:
    registry = GroupRegistry(redis_client, keys)
    holder = Lease(redis_client, keys.lease("g1"), 10, owner="holder")
    loser = Lease(redis_client, keys.lease("g1"), 10, owner="loser")
    assert holder.acquire()

    assert registry.set_status_if_holder("g1", holder.key, holder.token, state="connected")
    assert not registry.set_status_if_holder("g1", loser.key, loser.token, state="stopped")
    assert registry.status("g1") == {"state": "connected"}


def test_a_storage_failure_is_recorded_reported_and_cleared(redis_client: redis.Redis, keys: RedisKeys) -> None:
    error = OperationalError("INSERT ...", {}, Exception("database or disk is full"))
    record_storage_error(redis_client, keys, error)
    record_storage_error(redis_client, keys, error)
    failure = storage_error(redis_client, keys)
    assert failure is not None and failure["failed_runs"] == 2 and "disk is full" in str(failure["error"])

    snapshot = {
        "generated_at": int(failure["since"]) + 30_000,  # type: ignore[call-overload]
        "groups": [],
        "storage_error": failure,
        "backlog": 1234,
        "redis_memory": {"used": 1, "max": 0},
    }
    [problem] = problems(snapshot, Settings())
    assert "the drain cannot store since 30s (2 failed runs)" in problem
    assert "1234 frames wait in Redis" in problem and "free space" in problem

    clear_storage_error(redis_client, keys)
    assert storage_error(redis_client, keys) is None


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        (None, "streams must be a list of strings"),
        (["trade", 7], "streams[1] is 7 (int), not a string"),
        (["kline_2m"], "streams[0]: unknown kline interval"),
        ([], "no stream kinds given"),
    ],
)
def test_bad_stream_kinds_are_refused_naming_the_element(kinds: object, message: str) -> None:
    with pytest.raises(InvalidSubscription) as raised:
        normalize_stream_kinds(kinds)
    assert message in str(raised.value)


def test_stream_kinds_are_canonical_and_unique() -> None:
    assert normalize_stream_kinds(["TRADE", "trade", "aggtrade", "kline_1m", "KLINE_1m"]) == [
        "trade",
        "aggTrade",
        "kline_1m",
    ]
