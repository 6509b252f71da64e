"""Auto-tuner middleware: right-size each function's memory limit from its own history.

``before_run`` applies the recommendation learned from runs of *the same code*
under the same function name (unless the task named ``memory_mb``: an explicit
limit always wins); ``retry_limits`` gives a run that hit the OOM killer under a
*tuned* limit one more try at double the limit but at least the limit it would
have had untuned, and remembers the OOM so the next recommendation is higher;
``after_run`` records the run and stamps ``recommended_memory_mb`` /
``memory_tuned`` on the result. Redis trouble only costs the tuning, never the run.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from nanogrid_celery.common.redis import get_redis
from nanogrid_celery.middleware import Middleware, RunContext
from nanogrid_celery.middleware.tuning import (
    MB,
    RunRecord,
    TunerPolicy,
    TunerStore,
    recommend,
    retry_limit,
)
from nanogrid_celery.result import Status

if TYPE_CHECKING:
    from nanogrid_celery.config import Settings
    from nanogrid_celery.result import ExecutionResult
    from nanogrid_celery.sandbox.limits import RunLimits
    from nanogrid_celery.sandbox.outcome import Outcome

from nanogrid_celery.common.logs import get_logger

log = get_logger(__name__)

# Outcomes whose peak says nothing about the program's memory need.
NOT_LEARNED = {Status.REJECTED, Status.INTERNAL_ERROR, Status.COMPILE_ERROR}


class TunerMiddleware(Middleware):
    def __init__(self, settings: Settings, store: TunerStore | None = None) -> None:
        self.settings = settings
        self.policy = TunerPolicy.from_settings(settings)
        self._store = store

    @property
    def store(self) -> TunerStore:
        if self._store is None:  # built on first use: after the worker's fork
            self._store = TunerStore.from_settings(
                self.settings, get_redis(self.settings.redis_url)
            )
        return self._store

    def before_run(self, ctx: RunContext) -> None:
        try:
            peaks = self.store.peaks(ctx.function, ctx.code_hash)
        except RedisError as exc:
            log.warning("tuner history unavailable: %s", exc)
            return
        ctx.extra["tuner_peaks"] = peaks  # after_run updates this copy instead of re-reading
        rec = recommend(peaks, self.policy)
        ctx.extra["tuner_recommended_bytes"] = rec
        if rec is None or ctx.explicit_memory:
            return
        ctx.extra["tuner_untuned_bytes"] = ctx.limits.memory_bytes
        ctx.limits = replace(ctx.limits, memory_bytes=rec)
        ctx.tuned = True
        log.debug(  # "run finished" says memory_mb and memory_tuned at INFO
            "memory limit tuned",
            function=ctx.function,
            memory_mb=rec // MB,
        )

    def retry_limits(self, ctx: RunContext, outcome: Outcome) -> RunLimits | None:
        if outcome.status != Status.OOM or not ctx.tuned or ctx.extra.get("tuner_retried"):
            return None
        current = ctx.limits.memory_bytes
        bigger = retry_limit(current, self.policy, ctx.extra.get("tuner_untuned_bytes"))
        if bigger is None:
            return None
        ctx.extra["tuner_retried"] = True
        peak = outcome.peak_memory_bytes or current
        oom = RunRecord(peak, str(Status.OOM), current, True, time.time(), ctx.code_hash)
        try:
            self._record(ctx, oom)
        except Exception:  # bookkeeping must never cost the run its retry
            log.exception("could not record the oom for the tuner")
        fields = {"function": ctx.function, "from_mb": current // MB, "to_mb": bigger // MB}
        log.info("oom under a tuned limit; one retry, larger", **fields)
        return replace(ctx.limits, memory_bytes=bigger)

    def after_run(
        self, ctx: RunContext, result: ExecutionResult, exc: BaseException | None = None
    ) -> None:
        if ctx.function is None:  # rejected before its code was fetched: nothing to learn
            return
        result.memory_tuned = ctx.tuned
        if result.peak_memory_bytes is not None and result.status not in NOT_LEARNED:
            record = RunRecord(
                result.peak_memory_bytes,
                str(result.status),
                result.memory_limit_bytes,
                ctx.tuned,
                result.finished_at or time.time(),
                ctx.code_hash,
            )
            self._record(ctx, record)
        peaks = ctx.extra.get("tuner_peaks")
        if peaks is None:  # before_run could not read the history: nothing new to say
            rec = ctx.extra.get("tuner_recommended_bytes")
        else:
            rec = recommend(peaks, self.policy)
        result.recommended_memory_mb = rec // MB if rec else None

    def _record(self, ctx: RunContext, record: RunRecord) -> None:
        """Store the run and mirror it in the history copy read by ``before_run``."""
        try:
            self.store.record(ctx.function, record)
        except RedisError as exc:
            log.warning("could not record run for the tuner: %s", exc)
            return
        peaks = ctx.extra.get("tuner_peaks")
        if peaks is not None:
            ctx.extra["tuner_peaks"] = [record.peak_bytes, *peaks][: self.store.history_size]
