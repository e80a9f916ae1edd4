"""Celery configuration, importable by other apps that want the same routing.

Everything comes from `worker.settings` (environment variables with defaults).
"""

from __future__ import annotations

from datetime import timedelta

from kombu import Queue

from worker.settings import get_settings

_settings = get_settings()

broker_url = _settings.redis_url
result_backend = _settings.redis_url
broker_connection_retry_on_startup = True

# Timeouts and health checks on Celery's own Redis connections (broker and results), as
# on the service's: a half-open link must fail a command in seconds, not block a
# subscription task past its lease (Celery's result backend waits 120 s by default).
_redis_options = _settings.redis_connection_options
broker_transport_options = {
    key: _redis_options[key]
    for key in ("socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval")
}
redis_socket_timeout = _redis_options["socket_timeout"]
redis_socket_connect_timeout = _redis_options["socket_connect_timeout"]
redis_socket_keepalive = True
redis_backend_health_check_interval = _redis_options["health_check_interval"]
# A result write retries once, not 20 times a second apart: a progress report that
# cannot be stored is skipped (the next one follows in 5 s), the task goes on recording.
result_backend_transport_options = {
    "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
}

# JSON only: other apps call these tasks with send_task, and pickle is a liability.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# Subscription tasks run for ever and get their own queue (and worker), so they can
# never starve the drain. A plain `celery -A worker worker` consumes both queues.
task_default_queue = "celery"
task_queues = (Queue("celery"), Queue("streams"))
task_routes = {"tasks.stream_group": {"queue": "streams"}}

# Early ack: a subscription task is acknowledged when it starts, so the broker's
# visibility timeout can never redeliver a running one; the supervisor and the group
# lease take care of tasks that die (see worker/ingest/runner.py).
task_acks_late = False
worker_prefetch_multiplier = 1

# What makes Flower useful.
worker_send_task_events = True
task_send_sent_event = False  # beat's task-sent for every 1 s drain would bury the recording tasks in Flower
task_track_started = True
# What is kept in Redis expires: results of tasks someone called (subscribe, status, a
# manual drain) for a day. Beat's periodic runs keep none (see `_every`): one drain a
# second would otherwise leave 86,400 results a day in the Redis that holds the frames.
result_expires = timedelta(days=1)


def _every(task: str, seconds: float) -> dict[str, object]:
    """A periodic task whose message expires after one period: a run that could not
    start before the next one is due is left to that one, so a busy or stopped worker
    never finds a pile of stale runs when it comes back. Runs that must not overlap take
    turns through a Redis lock (see each task). Their results are not stored: their
    figures are in `status` and Flower (from the task events), and a stored result per
    run would grow Redis by a key a second."""
    return {"task": task, "schedule": seconds, "options": {"expires": seconds, "ignore_result": True}}


beat_schedule = {
    "drain": _every("tasks.drain", _settings.drain_interval_seconds),
    "supervise": _every("tasks.supervise", _settings.supervise_interval_seconds),
    "backfill": _every("tasks.backfill", _settings.backfill_interval_seconds),
    # Checks every drain interval which books need a snapshot; most runs fetch nothing.
    "snapshot-books": _every("tasks.snapshot_books", _settings.drain_interval_seconds),
    # One exchangeInfo request per market with a market subscription or subscribed futures contracts.
    "follow-listings": _every("tasks.follow_listings", _settings.listing_refresh_seconds),
    "enforce-retention": _every("tasks.enforce_retention", _settings.retention_interval_seconds),
    "archive-days": _every("tasks.archive_days", _settings.archive_interval_seconds),
    # Futures only; a run with no futures subscription asks nothing.
    "open-interest": _every("tasks.poll_open_interest", _settings.open_interest_interval_seconds),
}
if _settings.audit_enabled:
    beat_schedule["audit"] = _every("tasks.audit", _settings.audit_interval_seconds)
