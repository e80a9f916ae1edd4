"""tasks.audit: beat's audit of recent recorded days against the public data archive and REST."""

from __future__ import annotations

from typing import Any

from tasks.resources import engine, redis_client
from worker import app
from worker.exchange.audit import audit_wanted_streams
from worker.settings import get_settings


@app.task(name="tasks.audit")
def audit() -> dict[str, Any]:
    """Audit the wanted trade and aggTrade streams' last AUDIT_LOOKBACK_DAYS closed days
    that have recorded rows, no audit yet and a file in the archive; one run at a time.
    Beat runs it every AUDIT_INTERVAL_SECONDS unless AUDIT_ENABLED is off."""
    return audit_wanted_streams(get_settings(), redis_client(), engine())
