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

from worker.settings import Settings
from worker.store.storage import make_engine


def client_app(redis_url: str) -> Celery:
    """A Celery client that knows only the broker: tasks are called by name, exactly as
    another application that does not import this code would."""
    return Celery(broker=redis_url, backend=redis_url)


def call_task(redis_url: str, name: str, args: list[Any], timeout: float) -> Any:
    result = client_app(redis_url).send_task(name, args=args)
    return result.get(timeout=timeout)


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, **settings.redis_connection_options)


def existing_database(settings: Settings) -> Engine:
    """The engine of DATABASE_URL, refusing a SQLite file that does not exist: that means
    a wrong DATABASE_URL or a service that never ran, so say so instead of silently
    creating an empty database."""
    parsed = make_url(settings.database_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        raise ValueError(f"no database at {parsed.database}: check DATABASE_URL, or start the service first")
    return make_engine(settings.database_url, settings.sqlite_busy_timeout_ms)
