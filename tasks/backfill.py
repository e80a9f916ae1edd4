"""tasks.backfill: fill recent gaps (beat, no arguments) or fetch a history range (on demand)."""

from __future__ import annotations

from typing import Any

from tasks.resources import engine, redis_client
from worker import app
from worker.exchange.backfill import HistoryJob, repair_wanted_streams, run_history
from worker.settings import get_settings
from worker.streams import SPOT


@app.task(name="tasks.backfill", bind=True)
def backfill(
    self: Any,
    symbol: str | None = None,
    kind: str | None = None,
    start: int | None = None,
    end: int | None = None,
    market: str = SPOT,
) -> dict[str, Any]:
    """Without arguments: find and fill the gaps of the last BACKFILL_LOOKBACK_SECONDS in
    every wanted trade, aggTrade and kline stream, one run at a time.

    With `symbol`, `kind` ("aggTrade", "kline_<interval>", futures also "fundingRate"),
    `start` and `end` (ms since the epoch, end excluded) of `market` (spot, usdm, coinm):
    fetch that range from REST, resuming an earlier
    run of the same range; progress shows as state PROGRESS with meta
    {"done", "total", "rows"} (done and total in ms of the range).
    """
    settings = get_settings()
    if (symbol, kind, start, end) == (None, None, None, None):
        return repair_wanted_streams(settings, redis_client(), engine())

    def progress(done: int, total: int, rows: int) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "rows": rows})

    job = HistoryJob.checked(symbol, kind, start, end, market)
    return run_history(settings, redis_client(), engine(), job, progress)
