"""The Celery tasks. Their names (`tasks.subscribe`, ...) are a public contract:
other apps call them with `app.send_task(name, ...)` without importing this code."""

from tasks.maintenance import drain, status, supervise
from tasks.subscriptions import stream_group, subscribe, unsubscribe

__all__ = ["drain", "status", "stream_group", "subscribe", "supervise", "unsubscribe"]
