"""One request, start to finish: validate, fetch, lease, run, reset, result.

Every path out of :meth:`Runner.execute` is an :class:`ExecutionResult` -
hostile input becomes ``rejected``, our own failures ``internal_error`` after
one retry on a fresh container - so the task never raises and the worker
never dies on a submission. The runner is a straight line over four parts it
is given or builds: a pool (warm or cold, same interface), a sandbox (with
the executor chosen by name), a fetch function and the middleware hooks; the
Docker-free unit tests pass stubs for all four (tests/unit/test_runner.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import docker

from nanogrid_celery.common.identity import ProcessIdentity
from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import DependencyError, InternalError, RunRejected
from nanogrid_celery.execution.batch import Case, fill_batch, parse_cases, run_cases
from nanogrid_celery.execution.deps import Dependencies
from nanogrid_celery.execution.inputs import resolve_cases, resolve_stdin
from nanogrid_celery.execution.request import RunRequest, resolve_limits
from nanogrid_celery.execution.runtimes import Plan, plan_for, resolve_runtime
from nanogrid_celery.execution.storage import content_hash, fetch_submission
from nanogrid_celery.middleware import Hooks, Middleware, RunContext, default_middleware
from nanogrid_celery.result import ExecutionResult, Status
from nanogrid_celery.sandbox.box import Sandbox
from nanogrid_celery.sandbox.executors import Executor, get_executor
from nanogrid_celery.sandbox.lease import Lease
from nanogrid_celery.sandbox.outcome import Outcome
from nanogrid_celery.sandbox.output import decode
from nanogrid_celery.sandbox.pool import ColdPool, WarmPool, make_pool

log = get_logger(__name__)
DOCKER_WAIT_S = 30.0  # a dockerd restart takes ~3 s here; the retry waits this long at most
MAX_FAILURES = 2  # our own failures: the first is retried on a fresh container
MAX_ATTEMPTS = 3  # with middleware retries (a tuned OOM gets one more go at 2x)

T = TypeVar("T")
Fetch = Callable[[Settings, str, str, str], dict[str, bytes]]


class Runner:
    """Owns the pool, the sandbox and the hooks of one worker process."""

    def __init__(
        self,
        settings: Settings,
        client: docker.DockerClient | None = None,
        middleware: list[Middleware] | None = None,
        *,
        executor: Executor | None = None,
        pool: WarmPool | ColdPool | None = None,
        fetch: Fetch = fetch_submission,
        threads: int = 0,
        deps: Dependencies | None = None,
    ) -> None:
        self.settings = settings
        self._client = client
        self.executor = executor or get_executor(settings.executor, settings, self.client)
        self.sandbox = Sandbox(settings, self.executor)
        self.pool = pool or make_pool(
            settings, self.client, self.executor, self.sandbox.reset, threads=threads
        )
        self.fetch = fetch
        self.deps = deps or Dependencies(settings, lambda: self.client)
        self.hooks = Hooks(default_middleware(settings) if middleware is None else middleware)
        me = ProcessIdentity.current()
        self.worker = f"{me.host}:{me.pid}"

    @property
    def client(self) -> docker.DockerClient:
        """Made on first use: a stub pool and executor need no Docker at all."""
        if self._client is None:
            self._client = docker.from_env(timeout=30)
        return self._client

    def start(self) -> None:
        self.pool.start()  # reaps orphans first, then fills (warm)
        self.hooks.emit_start(self)
        self.deps.warm()  # NANOGRID_PREBUILT_ENVS, in the background

    def shutdown(self) -> None:
        self.pool.shutdown()

    # -- the request -----------------------------------------------------------
    def execute(self, req: RunRequest, received_at: float | None = None) -> ExecutionResult:
        received_at = received_at or time.time()
        t0 = time.perf_counter()
        result = ExecutionResult(
            request_id=req.request_id,
            runtime=str(req.runtime),
            status=Status.INTERNAL_ERROR,
            worker=self.worker,
            started_at=received_at,
        )
        if req.submitted_at:
            result.queue_ms = round(max(0.0, received_at - float(req.submitted_at)) * 1000, 3)
        ctx = RunContext(request=req, result=result)
        error: BaseException | None = None
        try:
            self._execute(ctx)
        except RunRejected as exc:
            error, result.status, result.message = exc, Status.REJECTED, str(exc)
        except DependencyError as exc:  # before any lease: nothing to retry, nothing touched
            error, result.status, result.message = exc, Status.DEPENDENCY_ERROR, str(exc)
        except InternalError as exc:
            error, result.status, result.message = exc, Status.INTERNAL_ERROR, str(exc)
        except Exception as exc:  # last line of defence: the worker must survive
            log.exception("unexpected failure")
            error, result.status = exc, Status.INTERNAL_ERROR
            result.message = f"unexpected {type(exc).__name__}: {exc}"
        result.finished_at = time.time()
        result.total_ms = round((time.perf_counter() - t0) * 1000, 3)
        self.hooks.emit_after(ctx, result, error)  # after the clock stops: they see total_ms
        log.info(
            "run finished",
            status=str(result.status),
            exit_code=result.exit_code,
            duration_ms=result.duration_ms,
            total_ms=result.total_ms,
            start=result.start,
            container=result.container_id,
            memory_mb=(result.memory_limit_bytes or 0) // MB or None,
            memory_tuned=result.memory_tuned,
            peak_bytes=result.peak_memory_bytes,  # what the tuner learns from this run
        )
        return result

    def _execute(self, ctx: RunContext) -> None:
        req, result = ctx.request, ctx.result
        ctx.runtime = result.runtime = resolve_runtime(req.runtime)
        ctx.limits = resolve_limits(self.settings, req.timeout_ms, req.memory_mb)
        result.limits = ctx.limits.as_dict()
        stdin = resolve_stdin(self.settings, req)
        raw_cases = resolve_cases(self.settings, req)
        cases = None
        if raw_cases is not None:
            cases = parse_cases(self.settings, raw_cases, req.timeout_ms, req.memory_mb)
        files = self.fetch(self.settings, ctx.runtime, req.s3_bucket, req.s3_key)
        plan = plan_for(ctx.runtime, set(files))
        ctx.code_hash = content_hash(files)
        ctx.function = result.function = req.function or ctx.code_hash
        # a batch is never memory-tuned: a case OOMing under a tuned limit gets no retry
        ctx.explicit_memory = req.memory_mb is not None or cases is not None
        env = self.deps.prepare(ctx.runtime, files, result)  # requirements.txt, before a lease
        if env is not None:
            plan = replace(plan, env={"PYTHONPATH": env.pythonpath})
        try:
            self.hooks.emit_before(ctx)
            if cases is not None:
                self._execute_batch(ctx, plan, files, cases)
            else:
                self._attempts(ctx, plan, files, stdin)
        finally:
            if env is not None:
                env.release()  # from here on it may be evicted

    def _attempts(
        self, ctx: RunContext, plan: Plan, files: dict[str, bytes], stdin: bytes | None
    ) -> None:
        result = ctx.result
        while True:
            result.limits = ctx.limits.as_dict()
            result.memory_limit_bytes = ctx.limits.memory_bytes
            outcome = self._leased(
                ctx, lambda lease: self.sandbox.run(lease, plan, files, stdin, ctx.limits)
            )
            retry = self.hooks.emit_retry(ctx, outcome) if ctx.attempt < MAX_ATTEMPTS else None
            if retry is None:
                _fill(result, outcome)
                return
            log.info("retrying with new limits", **retry.as_dict())
            ctx.limits = retry
            ctx.attempt += 1

    def _execute_batch(
        self, ctx: RunContext, plan: Plan, files: dict[str, bytes], cases: list[Case]
    ) -> None:
        """All cases in one lease (execution/batch.py); one retry on a fresh container."""
        ctx.result.limits = ctx.limits.as_dict() if ctx.limits else {}
        batch = self._leased(
            ctx, lambda lease: run_cases(self.settings, self.sandbox, lease, plan, files, cases)
        )
        fill_batch(self.settings, ctx.result, cases, batch)

    def _leased(self, ctx: RunContext, body: Callable[[Lease], T]) -> T:
        """``body`` in a leased container; our own failure is retried on a fresh one.

        ``ctx.failures`` counts across the whole request (middleware retries included):
        the second failure of ours ends it as ``internal_error``.
        """
        while True:
            ctx.result.attempts = ctx.attempt
            try:
                return self._run_once(ctx, body)
            except InternalError as exc:
                ctx.failures += 1
                log.warning("attempt %d failed: %s", ctx.attempt, exc)
                if ctx.failures == MAX_FAILURES:
                    raise InternalError(f"execution failed twice: {exc}") from exc
                self._wait_for_docker()
                ctx.attempt += 1

    def _run_once(self, ctx: RunContext, body: Callable[[Lease], T]) -> T:
        assert ctx.runtime is not None and ctx.limits is not None
        result = ctx.result
        t_lease = time.perf_counter()
        lease = self.pool.acquire(ctx.runtime)
        result.start_ms = round((time.perf_counter() - t_lease) * 1000, 3)
        result.container_id, result.start = lease.short_id, lease.start
        try:
            outcome = body(lease)
        except BaseException:
            self.pool.discard(lease, "run did not complete")
            raise
        self.pool.release(lease)  # warm: verified reset, then kept; cold: destroyed
        return outcome

    def _wait_for_docker(self, timeout: float = DOCKER_WAIT_S) -> None:
        """Before the retry: a daemon that is restarting gets a few seconds to come back."""
        if self._client is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._client.ping()
                return
            except (docker.errors.DockerException, OSError) as exc:
                if time.monotonic() > deadline:
                    log.warning("docker still unreachable after %.0f s: %s", timeout, exc)
                    return
            time.sleep(0.25)


def _fill(result: ExecutionResult, outcome: Outcome) -> None:
    result.status = outcome.status
    result.message = outcome.message
    result.exit_code = outcome.exit_code
    result.signal = outcome.signal
    result.stdout, result.stdout_encoding = decode(outcome.stdout.data, outcome.stdout.truncated)
    result.stderr, result.stderr_encoding = decode(outcome.stderr.data, outcome.stderr.truncated)
    result.stdout_truncated = outcome.stdout.truncated
    result.stderr_truncated = outcome.stderr.truncated
    result.duration_ms = outcome.duration_ms
    result.compile_ms = outcome.compile_ms
    result.compile_cached = outcome.compile_cached
    result.peak_memory_bytes = outcome.peak_memory_bytes
    result.cpu_time_ms = outcome.cpu_time_ms
    if outcome.memory_limit_bytes is not None:
        result.memory_limit_bytes = outcome.memory_limit_bytes
    if outcome.cpu_time_ms is not None and outcome.duration_ms:
        result.cpu_usage_percent = round(100 * outcome.cpu_time_ms / outcome.duration_ms, 1)
