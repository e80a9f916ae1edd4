"""The command line's connections: a Celery client, Redis and the database.

The CLI is an edge of the service: it builds its connections here, once per command,
and hands them to functions that take them as arguments (as the tasks do with theirs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from celery import Celery
from sqlalchemy.engine import Engine, make_url

# Celery rebuilds a task's exception with its own class only when the class's module is
# already imported; else as a stand-in that is no ValueError. These define the errors
# tasks raise for bad input, which the CLI tells apart from failures (exit 2, not 1).
import worker.exchange.rest  # noqa: F401
import worker.groups  # noqa: F401
from worker.settings import Settings
from worker.store.storage import make_engine


def client_app(redis_url: str) -> Celery:
    """A Celery client that knows only the broker: tasks are called by name, exactly as
    another application that does not import this code would."""
    return Celery(broker=redis_url, backend=redis_url)


class TaskFailed(RuntimeError):
    """A task raised on a worker; `bad_input` when the error is about what was asked."""

    def __init__(self, name: str, error: BaseException) -> None:
        self.bad_input = isinstance(error, ValueError)
        text = " ".join(str(error).split()) or type(error).__name__
        super().__init__(text if self.bad_input else f"{name} failed on the worker: {type(error).__name__}: {text}")


def call_task(redis_url: str, name: str, args: list[Any], timeout: float) -> Any:
    """Call a task by name and return its result; its exception becomes TaskFailed,
    so the CLI prints the worker's message, not the worker's traceback."""
    result = client_app(redis_url).send_task(name, args=args)
    value = result.get(timeout=timeout, propagate=False)
    if result.failed():
        raise TaskFailed(name, value)
    return value


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, **settings.redis_connection_options)


def existing_database(settings: Settings) -> Engine:
    """The engine of DATABASE_URL, refusing a SQLite file that does not exist: that means
    a wrong DATABASE_URL or a service that never ran, so say so instead of silently
    creating an empty database."""
    parsed = make_url(settings.database_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        raise ValueError(f"no database at {parsed.database}: check DATABASE_URL, or start the service first")
    return database(settings)


def database(settings: Settings) -> Engine:
    """The engine of DATABASE_URL, whether or not its SQLite file exists yet: for the
    metrics exporter, which may start before the first drain creates it and checks at
    every scrape instead (worker/ops/metrics.py)."""
    return make_engine(settings.database_url, settings.sqlite_busy_timeout_ms)
