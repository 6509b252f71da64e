"""The one thing every run ends as: an :class:`ExecutionResult`, whatever happened.

It travels as a plain JSON dict (Celery's Redis backend, the Redis stream), so
clients in any language can read it; :meth:`ExecutionResult.from_dict` rebuilds
the typed object and ignores fields it does not know, so old clients survive
new fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from nanogrid_celery.errors import InternalError, RunRejected

__all__ = ["ExecutionResult", "InternalError", "RunRejected", "Status"]


class Status(StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    TIMEOUT = "timeout"
    OOM = "oom"
    COMPILE_ERROR = "compile_error"
    REJECTED = "rejected"
    INTERNAL_ERROR = "internal_error"
    DEPENDENCY_ERROR = "dependency_error"  # requirements.txt could not be built (pip's reason)


@dataclass
class ExecutionResult:
    request_id: str
    runtime: str
    status: Status
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_encoding: str = "utf-8"
    stderr_encoding: str = "utf-8"
    duration_ms: float | None = None
    compile_ms: float | None = None
    total_ms: float | None = None
    queue_ms: float | None = None
    container_id: str | None = None
    start: str | None = None
    start_ms: float | None = None  # getting the container: unpause (warm) or create (cold)
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 1
    peak_memory_bytes: int | None = None
    cpu_time_ms: float | None = None
    cpu_usage_percent: float | None = None
    memory_limit_bytes: int | None = None
    function: str | None = None
    recommended_memory_mb: int | None = None
    memory_tuned: bool = False
    limits: dict[str, Any] = field(default_factory=dict)
    deps_env: str | None = None  # the requirements.txt environment's key (sandbox/envs.py)
    deps_ms: float | None = None  # getting it: ~0.1 ms when built, the build on first use
    callback: str | None = None  # callback_url delivery: "queued", "refused: ...", "off: ..."
    # issue 16: None when nothing was compiled; True when the host's build cache had the binary
    compile_cached: bool | None = None
    # a test-case batch: one dict per case (see execution/batch.py) and the verdict counts
    cases: list[dict[str, Any]] | None = None
    summary: dict[str, int] | None = None

    @property
    def ok(self) -> bool:
        return self.status == Status.SUCCESS

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = str(self.status)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionResult:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["status"] = Status(kwargs["status"])
        return cls(**kwargs)
