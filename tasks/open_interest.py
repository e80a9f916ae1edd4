"""tasks.poll_open_interest: the open interest of every subscribed futures symbol (beat)."""

from __future__ import annotations

from typing import Any

from tasks.resources import engine, redis_client
from worker import app
from worker.exchange.open_interest import poll_open_interest
from worker.exchange.rest import BinanceRest
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.settings import get_settings


@app.task(name="tasks.poll_open_interest")
def poll_open_interest_task() -> dict[str, Any]:
    """One poll of every subscribed futures symbol's open interest, one run at a time (a
    run slowed by the futures budget is not overlapped by the next tick's)."""
    settings = get_settings()
    client = redis_client()
    lock = Lease(
        client,
        RedisKeys(settings.redis_prefix).open_interest_lock,
        settings.open_interest_interval_seconds + settings.rest_max_wait_seconds,
        owner="open-interest",
    )
    if not lock.acquire():
        return {"skipped": "another open interest poll is in progress"}
    try:
        return poll_open_interest(
            settings, client, engine, lambda market: BinanceRest.from_settings(settings, client, market)
        )
    finally:
        lock.release()
