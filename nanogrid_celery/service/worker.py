"""Worker-process life cycle: build the pool after fork, tear it down on exit.

The Docker client must be created *after* the prefork fork (a client's
connection pool must not be shared between processes), so each child builds
its own runner and pool in ``worker_process_init``. Solo/threads pools never
fire that signal; :func:`get_runner` builds the runner lazily for them.
"""

from __future__ import annotations

import atexit
import logging
import threading

from celery.signals import (
    after_setup_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from nanogrid_celery.common.logs import configure
from nanogrid_celery.config import get_settings
from nanogrid_celery.execution.runner import Runner

log = logging.getLogger(__name__)
_runner: Runner | None = None
_lock = threading.Lock()


def get_runner() -> Runner:
    global _runner
    with _lock:
        if _runner is None:
            _runner = Runner(get_settings())
            _runner.start()
            atexit.register(_shutdown)
        return _runner


def _shutdown() -> None:
    global _runner
    with _lock:
        runner, _runner = _runner, None
    if runner is not None:
        runner.shutdown()


@after_setup_logger.connect
def _setup_logging(logger=None, **_kw) -> None:
    settings = get_settings()
    configure(settings.log_json, settings.log_level)


@worker_process_init.connect
def _on_process_init(**_kw) -> None:
    settings = get_settings()
    configure(settings.log_json, settings.log_level)
    get_runner()


@worker_process_shutdown.connect
def _on_process_shutdown(**_kw) -> None:
    _shutdown()


@worker_shutdown.connect
def _on_worker_shutdown(**_kw) -> None:
    _shutdown()
