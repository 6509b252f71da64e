"""One request, start to finish: validate, fetch, lease, run, reset, result.

Every path out of :meth:`Runner.execute` is an :class:`ExecutionResult` -
hostile input becomes ``rejected``, our own failures ``internal_error`` after
one retry on a fresh container - so the task never raises and the worker
never dies on a submission.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import docker
from docker.errors import DockerException

from nanogrid_celery.config import Settings
from nanogrid_celery.execution.runtimes import plan_for, resolve_runtime
from nanogrid_celery.execution.storage import content_hash, fetch_submission
from nanogrid_celery.middleware import Middleware, RunContext, default_middleware
from nanogrid_celery.result import ExecutionResult, InternalError, RunRejected, Status
from nanogrid_celery.sandbox.containers import Lease, create_container, destroy, reap_orphans
from nanogrid_celery.sandbox.executors.agent import make_sandbox
from nanogrid_celery.sandbox.executors.docker_exec import Outcome, RunLimits, SandboxDirty
from nanogrid_celery.sandbox.output import decode
from nanogrid_celery.sandbox.pool import WarmPool

log = logging.getLogger(__name__)
MB = 1024 * 1024
DOCKER_WAIT_S = 30.0  # a dockerd restart takes ~3 s here; the retry waits this long at most


@dataclass
class RunRequest:
    request_id: str
    runtime: str
    s3_bucket: str
    s3_key: str
    stdin: str | None = None
    timeout_ms: int | None = None
    memory_mb: int | None = None
    submitted_at: float | None = None
    function: str | None = None


def resolve_limits(settings: Settings, timeout_ms: int | None, memory_mb: int | None) -> RunLimits:
    """Defaults for what the task leaves out; out-of-range values are rejected, not clamped."""
    lim = settings.limits
    timeout = lim.default_timeout_ms if timeout_ms is None else timeout_ms
    memory = lim.default_memory_mb if memory_mb is None else memory_mb
    if not isinstance(timeout, int) or isinstance(timeout, bool):
        raise RunRejected(f"timeout_ms must be an integer, got {timeout_ms!r}")
    if not isinstance(memory, int) or isinstance(memory, bool):
        raise RunRejected(f"memory_mb must be an integer, got {memory_mb!r}")
    if not 1 <= timeout <= lim.max_timeout_ms:
        raise RunRejected(f"timeout_ms must be between 1 and {lim.max_timeout_ms}, got {timeout}")
    if not lim.min_memory_mb <= memory <= lim.max_memory_mb:
        raise RunRejected(
            f"memory_mb must be between {lim.min_memory_mb} and {lim.max_memory_mb}, got {memory}"
        )
    return RunLimits(
        timeout_ms=timeout,
        memory_bytes=memory * MB,
        pids=lim.pids,
        stdout_max_bytes=lim.stdout_max_bytes,
        stderr_max_bytes=lim.stderr_max_bytes,
    )


class Runner:
    """Owns the docker client, the pool (if enabled) and the sandbox of one worker process."""

    def __init__(
        self,
        settings: Settings,
        client: docker.DockerClient | None = None,
        middleware: list[Middleware] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or docker.from_env(timeout=30)
        self.sandbox = make_sandbox(settings, self.client)  # NANOGRID_EXECUTOR: agent | exec
        self.pool: WarmPool | None = None
        if settings.pool_enabled:
            self.pool = WarmPool(settings, self.client)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.middleware: list[Middleware] = (
            default_middleware(settings) if middleware is None else middleware
        )

    def start(self) -> None:
        if self.pool:
            self.pool.start()  # reaps orphans first
        else:  # a replacement for a killed child must still reap what that child left
            reap_orphans(self.settings, self.client)
        for mw in self.middleware:
            _guarded(mw.on_start, self)

    def shutdown(self) -> None:
        if self.pool:
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
        box: list[RunContext] = []
        try:
            self._execute(req, result, box)
        except RunRejected as exc:
            result.status, result.message = Status.REJECTED, str(exc)
        except InternalError as exc:
            result.status, result.message = Status.INTERNAL_ERROR, str(exc)
        except Exception as exc:  # last line of defence: the worker must survive
            log.exception("unexpected failure")
            result.status = Status.INTERNAL_ERROR
            result.message = f"unexpected {type(exc).__name__}: {exc}"
        result.finished_at = time.time()
        result.total_ms = round((time.perf_counter() - t0) * 1000, 3)
        for mw in self.middleware:
            _guarded(mw.after_run, box[0] if box else None, result)
        log.info(
            "run finished",
            extra={
                "fields": {
                    "status": str(result.status),
                    "exit_code": result.exit_code,
                    "duration_ms": result.duration_ms,
                    "total_ms": result.total_ms,
                    "start": result.start,
                }
            },
        )
        return result

    def _execute(self, req: RunRequest, result: ExecutionResult, box: list[RunContext]) -> None:
        runtime = resolve_runtime(req.runtime)
        result.runtime = runtime
        limits = resolve_limits(self.settings, req.timeout_ms, req.memory_mb)
        result.limits = limits.as_dict()
        stdin = _stdin_bytes(self.settings, req.stdin)
        files = fetch_submission(self.settings, runtime, req.s3_bucket, req.s3_key)
        plan = plan_for(runtime, set(files))
        ctx = RunContext(
            request=req,
            runtime=runtime,
            function=req.function or content_hash(files),
            limits=limits,
            explicit_memory=req.memory_mb is not None,
        )
        box.append(ctx)
        result.function = ctx.function
        for mw in self.middleware:
            _guarded(mw.before_run, ctx)
        failures = 0
        while True:
            result.attempts = ctx.attempt
            result.limits = ctx.limits.as_dict()
            result.memory_limit_bytes = ctx.limits.memory_bytes
            try:
                outcome = self._run_once(runtime, plan, files, stdin, ctx.limits, result)
            except (InternalError, DockerException, SandboxDirty, OSError) as exc:
                failures += 1
                log.warning("attempt %d failed: %s", ctx.attempt, exc)
                if failures == 2:
                    raise InternalError(f"execution failed twice: {exc}") from exc
                self._wait_for_docker()
                ctx.attempt += 1
                continue
            retry = None
            if ctx.attempt < 3:
                for mw in self.middleware:
                    retry = retry or _guarded(mw.retry_limits, ctx, outcome)
            if retry is None:
                _fill(result, outcome)
                return
            log.info("retrying with new limits", extra={"fields": retry.as_dict()})
            ctx.limits = retry
            ctx.attempt += 1

    def _wait_for_docker(self, timeout: float = DOCKER_WAIT_S) -> None:
        """Before the retry: a daemon that is restarting gets a few seconds to come back."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.ping()
                return
            except (DockerException, OSError) as exc:  # requests' ConnectionError is an OSError
                if time.monotonic() > deadline:
                    log.warning("docker still unreachable after %.0f s: %s", timeout, exc)
                    return
            time.sleep(0.25)

    def _run_once(self, runtime, plan, files, stdin, limits, result) -> Outcome:
        t_lease = time.perf_counter()
        lease = self._lease(runtime)
        result.start_ms = round((time.perf_counter() - t_lease) * 1000, 3)
        result.container_id, result.start = lease.short_id, lease.start
        try:
            outcome = self.sandbox.run(lease, plan, files, stdin, limits)
        except BaseException:
            self._dispose(lease, "run did not complete")
            raise
        self._recycle(lease)
        return outcome

    def _recycle(self, lease: Lease) -> None:
        """Reset and return the container; one that cannot be verified clean is replaced."""
        if not self.pool:
            destroy(lease)
            return
        try:
            self.sandbox.reset(lease)
        except SandboxDirty as exc:
            self.pool.discard(lease, str(exc))
            return
        self.pool.release(lease)

    def _dispose(self, lease: Lease, reason: str) -> None:
        if self.pool:
            self.pool.discard(lease, reason)
        else:
            destroy(lease)

    def _lease(self, runtime: str) -> Lease:
        if self.pool:
            return self.pool.acquire(runtime)
        lease = create_container(self.settings, self.client, runtime, role="cold")
        lease.start = "cold"
        return lease


def _stdin_bytes(settings: Settings, stdin: str | bytes | None) -> bytes | None:
    if stdin is None:
        return None
    data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
    if len(data) > settings.limits.max_stdin_bytes:
        raise RunRejected(f"stdin is {len(data)} bytes; at most {settings.limits.max_stdin_bytes}")
    return data


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
    result.peak_memory_bytes = outcome.peak_memory_bytes
    result.cpu_time_ms = outcome.cpu_time_ms
    if outcome.memory_limit_bytes is not None:
        result.memory_limit_bytes = outcome.memory_limit_bytes
    if outcome.cpu_time_ms is not None and outcome.duration_ms:
        result.cpu_usage_percent = round(100 * outcome.cpu_time_ms / outcome.duration_ms, 1)


def _guarded(hook, *args):
    """Run a middleware hook; a broken observer must never fail the run."""
    try:
        return hook(*args)
    except Exception:
        log.exception("middleware %s failed", getattr(hook, "__qualname__", hook))
        return None
