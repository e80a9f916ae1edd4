"""tasks.snapshot_books: fetch the REST depth snapshots that order books need (beat)."""

from __future__ import annotations

from typing import Any

from tasks.resources import engine, redis_client
from worker import app
from worker.exchange.rest import BinanceRest
from worker.exchange.snapshots import take_snapshots
from worker.keys import RedisKeys
from worker.lease import Lease
from worker.ops.status import book_statuses
from worker.settings import get_settings
from worker.streams import MARKETS, SPOT

# A run takes what a minute's weight budget holds (hundreds of snapshots at most) and
# renews the lock before each; a run whose worker was killed frees it this long afterwards.
LOCK_TTL_SECONDS = 120.0


@app.task(name="tasks.snapshot_books", bind=True, send_events=False)  # a tick a second: no rows in Flower
def snapshot_books(self: Any) -> dict[str, Any]:
    """Snapshots for books that must be (re)synced or are due; one run at a time. The
    result also lists every recorded book's state for a caller; beat's ticks keep no
    result and send no events (a row a second would bury the recording tasks in Flower),
    so the states are read in `status`, and a tick does not list them: at 1,500 books
    the listing cost a tenth of a core (docs/performance.md)."""
    settings = get_settings()
    client = redis_client()
    keys = RedisKeys(settings.redis_prefix)
    lock = Lease(client, keys.snapshot_lock, LOCK_TTL_SECONDS, owner="snapshot-books")
    if not lock.acquire():
        return {"skipped": "another snapshot run is in progress"}
    try:
        done = {
            market: take_snapshots(
                settings, client, engine, BinanceRest.from_settings(settings, client, market), lock.renew
            )
            for market in MARKETS
        }
        listed = {} if self.request.ignore_result else {"books": book_statuses(client, keys)}
        return {**done[SPOT], "futures": {m: done[m] for m in MARKETS if m != SPOT}, **listed}
    finally:
        lock.release()
