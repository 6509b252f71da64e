"""A request as the task received it, and the limits it resolves to.

Out-of-range limits are *rejected*, never clamped: a client that asks for
more than the deployment allows must hear so, not get a silently different
run.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import RunRejected
from nanogrid_celery.sandbox.limits import RunLimits


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
    callback_url: str | None = None  # POSTed the result by delivery/callbacks.py, never run
    # issue 16: large stdin and test-case batches (see execution/inputs.py, execution/batch.py)
    stdin_s3_key: str | None = None
    cases: list[dict] | None = None
    cases_s3_key: str | None = None


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


def stdin_bytes(settings: Settings, stdin: str | bytes | None) -> bytes | None:
    if stdin is None:
        return None
    data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
    if len(data) > settings.limits.max_stdin_bytes:
        raise RunRejected(f"stdin is {len(data)} bytes; at most {settings.limits.max_stdin_bytes}")
    return data
