"""The Celery tasks. Their names (`tasks.subscribe`, ...) are a public contract:
other apps call them with `app.send_task(name, ...)` without importing this code."""

from tasks.archive import archive_closed_days
from tasks.audit import audit
from tasks.backfill import backfill
from tasks.books import snapshot_books
from tasks.maintenance import drain, status, supervise
from tasks.open_interest import poll_open_interest_task
from tasks.retention import enforce_retention
from tasks.subscriptions import stream_group, subscribe, unsubscribe
from tasks.workers import stream_processes  # noqa: F401  (connects the worker signals)

__all__ = [
    "audit",
    "archive_closed_days",
    "backfill",
    "drain",
    "enforce_retention",
    "poll_open_interest_task",
    "snapshot_books",
    "status",
    "stream_group",
    "subscribe",
    "supervise",
    "unsubscribe",
]
