"""Hooks around a run, one concern per module (as in dramatiq's middleware).

The runner stays a straight line - fetch, lease, run, reset - and everything
that only *observes* or *advises* a run (the auto-tuner, result publishing,
metrics) lives in a middleware. :func:`default_middleware` is the one list
that says which are on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanogrid_celery.config import Settings
    from nanogrid_celery.execution.runner import Runner, RunRequest
    from nanogrid_celery.result import ExecutionResult
    from nanogrid_celery.sandbox.executors.docker_exec import Outcome, RunLimits


@dataclass
class RunContext:
    """What middleware may read (and, in ``before_run``, change) about one run."""

    request: RunRequest
    runtime: str
    function: str
    limits: RunLimits
    explicit_memory: bool
    tuned: bool = False
    attempt: int = 1
    extra: dict = field(default_factory=dict)


class Middleware:
    """Override what you need; every hook is optional and must not raise into the run."""

    def before_run(self, ctx: RunContext) -> None:
        """Called once the submission is fetched and valid, before a container is leased."""

    def retry_limits(self, ctx: RunContext, outcome: Outcome) -> RunLimits | None:
        """Return new limits to run once more (e.g. an OOM under a tuned limit), else None."""
        return None

    def after_run(self, ctx: RunContext | None, result: ExecutionResult) -> None:
        """Called with every final result, rejected and internal errors included."""

    def on_start(self, runner: Runner) -> None:
        """Called once when the runner has started (pool filling); e.g. to watch the pool."""


def default_middleware(settings: Settings) -> list[Middleware]:
    """The middleware a worker runs with; each module adds itself here."""
    active: list[Middleware] = []
    if settings.tuner_enabled:
        from nanogrid_celery.middleware.tuner import TunerMiddleware

        active.append(TunerMiddleware(settings))
    if settings.events_enabled:  # after the tuner: events carry its fields
        from nanogrid_celery.middleware.result_stream import ResultStreamMiddleware

        active.append(ResultStreamMiddleware(settings))
    if settings.metrics_port > 0:  # last: counts the final result, tuner fields included
        from nanogrid_celery.middleware.metrics import MetricsMiddleware

        active.append(MetricsMiddleware(settings))
    return active
