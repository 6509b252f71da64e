"""Prometheus metrics for every run and the pool (on when ``NANOGRID_METRICS_PORT`` > 0).

The metric definitions and the endpoint live in :mod:`nanogrid_celery.monitoring.prometheus`;
this middleware only feeds them: each final result in ``after_run``, and the pool's
state from a sampler thread started in ``on_start``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanogrid_celery.middleware import Middleware, RunContext
from nanogrid_celery.monitoring import prometheus as metrics

if TYPE_CHECKING:
    from nanogrid_celery.config import Settings
    from nanogrid_celery.execution.runner import Runner
    from nanogrid_celery.result import ExecutionResult


class MetricsMiddleware(Middleware):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sampler: metrics.PoolSampler | None = None
        self.runner: Runner | None = None

    def on_start(self, runner: Runner) -> None:
        self.runner = runner
        if self.sampler is None:
            self.sampler = metrics.PoolSampler(runner.pool).start()

    def after_run(
        self, ctx: RunContext, result: ExecutionResult, exc: BaseException | None = None
    ) -> None:
        metrics.observe(result)
        if self.runner is not None:
            metrics.sample_pool(self.runner.pool)  # fresh right after a lease and release
