"""tasks.backfill: fill recent gaps (beat, no arguments) or fetch a history range (on demand)."""

from __future__ import annotations

from typing import Any

from tasks.resources import engine, redis_client
from worker import app
from worker.exchange.archive import DayReport, checked_job, run_backfill
from worker.exchange.backfill import repair_wanted_streams
from worker.settings import get_settings
from worker.streams import SPOT


@app.task(name="tasks.backfill", bind=True)
def backfill(
    self: Any,
    symbol: str | None = None,
    kind: str | None = None,
    start: int | None = None,
    end: int | None = None,
    source: str = "rest",
    market: str = SPOT,
) -> dict[str, Any]:
    """Without arguments: find and fill the gaps of the last BACKFILL_LOOKBACK_SECONDS in
    every wanted trade, aggTrade and kline stream, one run at a time.

    With `symbol`, `kind` ("trade", "aggTrade", "kline_<interval>", futures also
    "fundingRate"), `start` and `end` (ms since the epoch, end excluded) of `market` (spot,
    usdm, coinm): fetch that range. `source` "rest" (the default, spot trades excepted)
    resumes an earlier run of the same range; "auto" takes closed days from spot's public
    data archive and the rest from REST (a futures market's is REST); "archive" the
    archive only. Progress shows as state PROGRESS with meta {"done", "total", "rows",
    "days"} (done and total in ms of the range; days: a line per finished day, its source
    and rows).
    """
    settings = get_settings()
    if (symbol, kind, start, end) == (None, None, None, None):
        return repair_wanted_streams(settings, redis_client(), engine())

    days: list[str] = []

    def progress(done: int, total: int, rows: int) -> None:
        self.update_state(state="PROGRESS", meta={"done": done, "total": total, "rows": rows, "days": days})

    def day_done(report: DayReport) -> None:
        days.append(report.line())

    job = checked_job(symbol, kind, start, end, source, market)
    return run_backfill(settings, redis_client(), engine(), job, source, progress, day_done)
