"""The Celery application: `celery -A worker worker|beat|flower` finds it as `worker.app`."""

from __future__ import annotations

from celery import Celery

app = Celery("worker", include=["tasks"])
app.config_from_object("celeryconfig")
