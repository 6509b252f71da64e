"""The worker's life cycle in one place: what starts and stops, in which process and order.

Installed once by :mod:`nanogrid_celery.app` (:func:`install`); nothing else
registers worker signal handlers, so import order decides nothing.

Main process - :class:`NanoGridStep`, a bootstep in the worker blueprint
(a thin step over plain classes, as celery's ``worker/consumer/heart.py``):

1. refuse a visibility timeout shorter than the longest allowed run
   (``VisibilityTooShort``: the worker exits with the reason);
2. metrics: create the multiprocess directory *before* the pool forks;
3. dead-letter queue and redrive policy on the work queue (SQS only);
4. after the pool has started: the visibility heartbeat, then ``/metrics``;
5. at shutdown, in reverse: ``/metrics``, then the heartbeat.

Every pool child (prefork ``worker_process_init``): logging, then the runner
(Docker client, warm pool) - after the fork, because a Docker client must not
cross it; at child exit its containers are removed and its live metrics
marked dead. Solo/threads pools have no children: the bootstep builds their runner in the
main process once the pool has started, and ``worker_shutdown`` removes it.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, bootsteps
from celery.signals import (
    after_setup_logger,
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from nanogrid_celery.common.logs import configure, get_logger
from nanogrid_celery.config import get_settings
from nanogrid_celery.delivery.deadletter import setup_dead_letter_queue
from nanogrid_celery.delivery.visibility import (
    VisibilityHeartbeat,
    check_visibility_timeout,
    is_sqs,
)
from nanogrid_celery.monitoring.prometheus import MetricsServer, child_exited
from nanogrid_celery.service import status
from nanogrid_celery.service import worker as service_worker
from nanogrid_celery.service.worker import get_runner, shutdown_runner

log = get_logger(__name__)


class NanoGridStep(bootsteps.StartStopStep):
    """The main process's NanoGrid parts, started after the pool (see the module doc)."""

    label = "NanoGrid"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        settings = get_settings()
        check_visibility_timeout(settings)  # 1
        self.metrics = MetricsServer(settings.metrics_port, settings.metrics_host)
        self.metrics.prepare()  # 2: before the pool forks (the Pool step starts after us)
        setup_dead_letter_queue(settings)  # 3
        self.heartbeat = VisibilityHeartbeat(settings) if is_sqs(settings) else None
        pool_name = f"{getattr(worker.pool_cls, '__module__', '')}.{worker.pool_cls}"
        self.forks = "prefork" in pool_name  # else tasks run in this process (threads, solo)
        if "thread" in pool_name:  # many tasks in this one process: let its pool grow to them
            service_worker.task_threads = int(worker.concurrency or 1)
        if self.heartbeat is not None:
            task_received.connect(self._track, weak=False)

    def _track(self, request: Any = None, **_kw: Any) -> None:
        if self.heartbeat is not None and request is not None:
            self.heartbeat.track(request)

    def start(self, worker: Any) -> None:  # 4
        if not self.forks:  # threads/solo: this process runs the tasks; warm its pool now
            get_runner()
        if self.heartbeat is not None:
            self.heartbeat.start()
        self.metrics.start()

    def stop(self, worker: Any) -> None:  # 5
        self.metrics.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
            task_received.disconnect(self._track)

    shutdown = stop

    def info(self, worker: Any) -> dict[str, Any]:
        """``celery inspect stats``: pool sizes, targets and warm/cold/grow/shrink counts."""
        runner = service_worker.current_runner()  # -P threads / solo: the pool is right here
        pools = runner.pool.stats() if runner is not None else status.collect(get_settings())
        return {"nanogrid": {"pools": pools, "task_threads": service_worker.task_threads}}


def _configure_logging(**_kw: Any) -> None:
    settings = get_settings()
    configure(settings.log_json, settings.log_level)


def _child_started(**_kw: Any) -> None:
    _configure_logging()
    get_runner()


def _child_exiting(pid: int | None = None, **_kw: Any) -> None:
    shutdown_runner()
    child_exited(pid or os.getpid())


def install(app: Celery) -> None:
    """Wire the life cycle into ``app``: the bootstep and the per-child hooks."""
    app.steps["worker"].add(NanoGridStep)
    after_setup_logger.connect(_configure_logging, weak=False)
    worker_process_init.connect(_child_started, weak=False)
    worker_process_shutdown.connect(_child_exiting, weak=False)
    worker_shutdown.connect(lambda **_kw: shutdown_runner(), weak=False)
