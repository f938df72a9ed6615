"""Background tasks that cannot end unseen.

A long-lived task of the service (the bus's publisher and election, the
gateway's heartbeat and re-checks, the catalog's refresh) that ends with an
exception leaves that part of the service stopped while the process lives
on, and asyncio says so only when the task is garbage-collected, if ever.
:func:`spawn` makes such an end a failure the process shows at once: logged
with its traceback, counted in ``caspian_task_failures_total{task}``, and
listed by :func:`failed`, which turns ``/healthz`` to 503 (an orchestrator
restarts the process) and ``/readyz`` to not ready (a load balancer sends
clients elsewhere). Tasks that end normally or are cancelled are not failures.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Coroutine
from typing import Any

from caspian.metrics import TASK_FAILURES

log = logging.getLogger(__name__)

#: Per event loop (each service runs on its own), the names of the tasks that failed.
_failed: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[str]] = (
    weakref.WeakKeyDictionary()
)


def spawn(coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(coroutine, name=name)
    task.add_done_callback(_ended)
    return task


def _ended(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        return
    name = task.get_name()
    TASK_FAILURES.labels(name).inc()
    log.critical(
        "background task %s failed: this process is broken until it is restarted",
        name,
        exc_info=error,
    )
    _failed.setdefault(task.get_loop(), []).append(name)


def failed() -> list[str]:
    """The tasks of the running loop that ended with an exception."""
    return list(_failed.get(asyncio.get_running_loop(), ()))
