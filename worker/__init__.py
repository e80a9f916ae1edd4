"""The recorder's machinery; `worker.app` is the Celery application."""

from worker.celery_app import app

__all__ = ["app"]
