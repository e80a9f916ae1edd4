"""What a worker tells the others about itself: how many groups a `streams` worker can
record, reported with every heartbeat, so that `subscribe` knows when none is free; and
what a task needs to know of its own worker node (its processes, for the drain lanes)."""

from __future__ import annotations

from typing import Any

from celery.signals import heartbeat_sent, worker_init, worker_ready, worker_shutdown

from tasks.resources import redis_client
from worker.groups import StreamProcesses
from worker.keys import RedisKeys
from worker.settings import get_settings

# This process's worker, when it consumes `streams`: its name and process count.
_stream_worker: dict[str, Any] = {}
# This process's worker controller, remembered in the main process before the pool
# forks, so that the pool's processes read their node's concurrency from it.
_this_worker: dict[str, Any] = {}


@worker_init.connect
def _remember_this_worker(sender: Any, **_: Any) -> None:
    _this_worker["controller"] = sender


def node_processes() -> int | None:
    """How many processes this worker node's pool has (its `-c`); None outside a worker."""
    controller = _this_worker.get("controller")
    return int(controller.concurrency) if controller is not None else None


def stream_processes() -> StreamProcesses:
    return StreamProcesses(redis_client(), RedisKeys(get_settings().redis_prefix))


@worker_ready.connect
def _count_stream_processes(sender: Any, **_: Any) -> None:
    """Remember, in a worker that consumes `streams`, how many groups it can record."""
    if "streams" in sender.app.amqp.queues.consume_from:
        _stream_worker.update(worker=sender.hostname, processes=sender.controller.concurrency)
        _report_stream_processes()


@heartbeat_sent.connect
def _report_stream_processes(**_: Any) -> None:
    if _stream_worker:
        stream_processes().report(**_stream_worker)


@worker_shutdown.connect
def _forget_stream_processes(**_: Any) -> None:
    if _stream_worker:
        stream_processes().forget(_stream_worker["worker"])
