"""Hooks around a run, one concern per module, dispatched in one place (as in dramatiq).

The runner stays a straight line - fetch, lease, run, reset - and everything
that only *observes* or *advises* a run (the auto-tuner, result publishing,
metrics) is a :class:`Middleware`. :class:`Hooks` is the one dispatcher:
before-hooks run in list order, after-hooks in *reverse* order (dramatiq's
``emit_before``/``emit_after``), so the outermost middleware sees the run
first and the final result last, and a hook that fails is logged and skipped:
a broken observer never fails the run.

:func:`default_middleware` is the one list that says which are on:
``[metrics, result stream, tuner, callbacks]``; after a run the tuner stamps its fields
first, the stream publishes them, metrics count the final result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nanogrid_celery.common.logs import get_logger

if TYPE_CHECKING:
    from nanogrid_celery.config import Settings
    from nanogrid_celery.execution.request import RunRequest
    from nanogrid_celery.execution.runner import Runner
    from nanogrid_celery.result import ExecutionResult
    from nanogrid_celery.sandbox.limits import RunLimits
    from nanogrid_celery.sandbox.outcome import Outcome

log = get_logger(__name__)


@dataclass
class RunContext:
    """One run as middleware sees it; filled in as the run gets that far.

    ``function``/``limits`` are None when the run was rejected before its code
    was fetched; ``before_run`` may replace ``limits``.
    """

    request: RunRequest
    result: ExecutionResult
    runtime: str | None = None
    function: str | None = None
    code_hash: str | None = None  # content hash of the fetched files: what the tuner learns for
    limits: RunLimits | None = None
    explicit_memory: bool = False
    tuned: bool = False
    attempt: int = 1
    failures: int = 0  # our own failures so far (the runner allows one retry)
    extra: dict[str, Any] = field(default_factory=dict)


class Middleware:
    """Override what you need; every hook is optional and must not raise into the run."""

    def on_start(self, runner: Runner) -> None:
        """Called once when the runner has started (pool filling); e.g. to watch the pool."""

    def before_run(self, ctx: RunContext) -> None:
        """Called once the submission is fetched and valid, before a container is leased."""

    def retry_limits(self, ctx: RunContext, outcome: Outcome) -> RunLimits | None:
        """Return new limits to run once more (e.g. an OOM under a tuned limit), else None."""
        return None

    def after_run(
        self, ctx: RunContext, result: ExecutionResult, exc: BaseException | None = None
    ) -> None:
        """Called with every final result, rejected and internal errors included.

        ``exc`` is what ended the run early (RunRejected, InternalError, ...), or None.
        """


class Hooks:
    """Dispatches middleware hooks: in order before, in reverse order after; errors contained."""

    def __init__(self, middleware: Iterable[Middleware]) -> None:
        self.middleware = list(middleware)

    def emit_start(self, runner: Runner) -> None:
        for mw in self.middleware:
            _guarded(mw.on_start, runner)

    def emit_before(self, ctx: RunContext) -> None:
        for mw in self.middleware:
            _guarded(mw.before_run, ctx)

    def emit_retry(self, ctx: RunContext, outcome: Outcome) -> RunLimits | None:
        """The first middleware that asks for another attempt decides its limits."""
        for mw in self.middleware:
            limits = _guarded(mw.retry_limits, ctx, outcome)
            if limits is not None:
                return limits
        return None

    def emit_after(
        self, ctx: RunContext, result: ExecutionResult, exc: BaseException | None = None
    ) -> None:
        for mw in reversed(self.middleware):
            _guarded(mw.after_run, ctx, result, exc)


def _guarded(hook: Callable[..., Any], *args: Any) -> Any:
    try:
        return hook(*args)
    except Exception:
        log.exception("middleware %s failed", getattr(hook, "__qualname__", hook))
        return None


def default_middleware(settings: Settings) -> list[Middleware]:
    """The middleware a worker runs with, outermost first (see the module doc)."""
    active: list[Middleware] = []
    if settings.metrics_port > 0:  # outermost: counts the final result, tuner fields included
        from nanogrid_celery.middleware.metrics import MetricsMiddleware

        active.append(MetricsMiddleware(settings))
    if settings.events_enabled:  # publishes the result after the tuner stamped it
        from nanogrid_celery.middleware.result_stream import ResultStreamMiddleware

        active.append(ResultStreamMiddleware(settings))
    if settings.tuner_enabled:  # innermost: sets limits first, stamps its fields first
        from nanogrid_celery.middleware.tuner import TunerMiddleware

        active.append(TunerMiddleware(settings))
    # innermost of all: checks a run's callback_url and stamps result.callback before the
    # stream publishes it; delivers after Celery stored the result (delivery/callbacks.py)
    from nanogrid_celery.delivery.callbacks import CallbackMiddleware

    active.append(CallbackMiddleware(settings))
    return active
