"""Tells long-running subscription tasks that their worker is shutting down.

On SIGTERM a Celery worker starts a warm shutdown: it stops taking messages and waits
for running tasks to finish. A subscription task never finishes by itself, so without
this the worker would hang until it is killed, losing the frames it held. The event
below is created before the prefork pool forks its children, so the main process can
set it (on `worker_shutting_down`) and every child sees it within a second.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from celery.signals import worker_shutting_down

_shutdown = multiprocessing.get_context("fork").Event()


@worker_shutting_down.connect
def _announce_shutdown(**_: Any) -> None:
    _shutdown.set()


def shutting_down() -> bool:
    return _shutdown.is_set()
