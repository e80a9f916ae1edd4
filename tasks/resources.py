"""Per-process connections: one Redis client and one database engine per process.

Celery's prefork pool forks children after the main process has imported everything;
a connection opened before the fork must not be shared with the children. Both are
therefore created on first use and keyed by process id.
"""

from __future__ import annotations

import os

import redis
from sqlalchemy.engine import Engine

from worker.settings import get_settings
from worker.store import storage

_redis: dict[int, redis.Redis] = {}
_engines: dict[int, Engine] = {}


def redis_client() -> redis.Redis:
    pid = os.getpid()
    if pid not in _redis:
        settings = get_settings()
        _redis[pid] = redis.Redis.from_url(settings.redis_url, **settings.redis_connection_options)
    return _redis[pid]


def engine() -> Engine:
    """The database engine, with the schema created on first use in this process."""
    pid = os.getpid()
    if pid not in _engines:
        settings = get_settings()
        new_engine = storage.make_engine(settings.database_url, settings.sqlite_busy_timeout_ms)
        storage.create_schema(new_engine)
        _engines[pid] = new_engine
    return _engines[pid]
