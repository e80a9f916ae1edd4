"""The Celery tasks. Their names (`tasks.subscribe`, ...) are a public contract:
other apps call them with `app.send_task(name, ...)` without importing this code."""

from tasks.backfill import backfill
from tasks.books import snapshot_books
from tasks.maintenance import drain, status, supervise
from tasks.open_interest import poll_open_interest_task
from tasks.retention import enforce_retention
from tasks.subscriptions import stream_group, subscribe, unsubscribe
from tasks.workers import stream_processes  # noqa: F401  (connects the worker signals)

__all__ = [
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
