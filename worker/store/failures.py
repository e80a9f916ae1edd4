"""Storage failures as state: what the drain could not store, since when.

A drain run that cannot write (the database locked by another process, the disk full)
fails and is retried a second later; nothing is lost, the frames wait in Redis. But
an operator must hear of it before Redis fills: the first failure of a streak sets
`since`, every failing run updates the error text, and the first run that stores
again clears the record. `status` turns a present record into a problem.
"""

from __future__ import annotations

import redis

from worker.keys import RedisKeys, as_text
from worker.times import now_ms


def record_storage_error(client: redis.Redis, keys: RedisKeys, error: BaseException) -> None:
    at = now_ms()
    # SQLAlchemy wraps the driver's error with the statement and its parameters (5,000
    # rows of them); the driver's own words are what an operator can act on.
    cause = getattr(error, "orig", None) or error
    text = " ".join(f"{type(cause).__name__}: {cause}".split())[:500]
    with client.pipeline(transaction=True) as pipe:
        pipe.hsetnx(keys.storage_error, "since", at)
        pipe.hset(keys.storage_error, mapping={"error": text, "last_at": at})
        pipe.hincrby(keys.storage_error, "failed_runs", 1)
        pipe.execute()


def clear_storage_error(client: redis.Redis, keys: RedisKeys) -> None:
    client.delete(keys.storage_error)


def storage_error(client: redis.Redis, keys: RedisKeys) -> dict[str, object] | None:
    """The current failure streak, or None when the last drain run stored its batches."""
    raw = {as_text(k): as_text(v) for k, v in client.hgetall(keys.storage_error).items()}
    if not raw:
        return None
    return {
        "error": raw.get("error", ""),
        "since": int(raw.get("since", 0)),
        "last_at": int(raw.get("last_at", 0)),
        "failed_runs": int(raw.get("failed_runs", 0)),
    }


def storage_advice(error: str) -> str:
    """What an operator does about a storage error, from SQLite's and the OS's words."""
    lowered = error.lower()
    if "locked" in lowered or "busy" in lowered:
        return "another process holds the database lock: find it (`fuser <database file>`) and end its transaction"
    if "full" in lowered or "no space" in lowered or "quota" in lowered:
        return "the disk is full: free space on the database's volume; buffered frames are stored once it has room"
    return "see the drain's traceback in the default worker's log"
