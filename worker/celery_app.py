"""The Celery application: `celery -A worker worker|beat|flower` finds it as `worker.app`."""

from __future__ import annotations

from celery import Celery

import worker.shutdown  # noqa: F401  (connects the shutdown signal before the pool forks)

app = Celery("worker", include=["tasks"])
app.config_from_object("celeryconfig")
