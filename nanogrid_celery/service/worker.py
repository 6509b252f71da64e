"""This worker process's runner: built after the fork, on first use, torn down once.

The Docker client must be created *after* the prefork fork (a client's
connection pool must not be shared between processes), so each child builds
its own runner and pool when :mod:`~nanogrid_celery.service.lifecycle` tells it
the child has started; solo/threads pools never fork, and
:func:`get_runner` builds the runner lazily for them.
"""

from __future__ import annotations

import atexit

from nanogrid_celery.common.perprocess import PerProcess
from nanogrid_celery.config import get_settings
from nanogrid_celery.execution.runner import Runner
from nanogrid_celery.service import status

#: tasks this process runs at once under ``-P threads`` (set by the lifecycle bootstep;
#: 0 = prefork child or solo: one at a time). Demand-sized pools grow up to it.
task_threads = 0


def _build(_key: str) -> Runner:
    runner = Runner(get_settings(), threads=task_threads)
    runner.start()
    atexit.register(shutdown_runner)
    status.start_publisher(runner.settings, runner.pool)
    return runner


_runners: PerProcess[str, Runner] = PerProcess(_build)


def get_runner() -> Runner:
    return _runners.get("runner")


def current_runner() -> Runner | None:
    """This process's runner if it has been built (inspect stats must not build one)."""
    return _runners.peek("runner")


def shutdown_runner() -> None:
    """Remove this process's containers; a second call (atexit after a signal) is a no-op."""
    runner = _runners.pop("runner")
    if runner is not None:
        runner.shutdown()
