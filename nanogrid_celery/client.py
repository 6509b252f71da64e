"""Submit code and get results: upload to S3, enqueue ``run_code``, wait on Redis.

The request id doubles as the Celery task id, so ``AsyncResult(request_id)``
finds a result from any process that knows the id.
"""

from __future__ import annotations

import io
import time
import uuid
import zipfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery.result import AsyncResult

from .app import app
from .config import Settings, get_settings
from .result import ExecutionResult
from .storage import ensure_bucket, upload

Submission = str | Path | Mapping[str, bytes | str]


@lru_cache(maxsize=8)
def _bucket_ready(settings: Settings) -> str:
    return ensure_bucket(settings)


def _zip(files: Mapping[str, bytes | str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content.encode() if isinstance(content, str) else content)
    return buf.getvalue()


def _package(code: Submission) -> tuple[str, bytes]:
    """(object name, bytes): a file goes up as-is, a folder or a file map as one zip."""
    if isinstance(code, Mapping):
        return "code.zip", _zip(code)
    path = Path(code)
    if path.is_dir():
        files = {
            str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
        }
        return "code.zip", _zip(files)
    return path.name, path.read_bytes()


def upload_code(
    code: Submission, request_id: str, settings: Settings | None = None
) -> tuple[str, str]:
    """Put the code in S3 under ``submissions/<request id>/``; returns (bucket, key)."""
    settings = settings or get_settings()
    bucket = _bucket_ready(settings)
    name, data = _package(code)
    key = f"submissions/{request_id}/{name}"
    upload(settings, key, data, bucket)
    return bucket, key


def enqueue(
    request_id: str, runtime: str, bucket: str, key: str, queue: str | None = None, **options: Any
) -> AsyncResult:
    """Send ``run_code`` for code already in S3 (``options``: stdin, timeout_ms, memory_mb)."""
    kwargs = {
        "request_id": request_id,
        "runtime": runtime,
        "s3_bucket": bucket,
        "s3_key": key,
        "submitted_at": time.time(),
        **{k: v for k, v in options.items() if v is not None},
    }
    return app.send_task("nanogrid.run_code", kwargs=kwargs, task_id=request_id, queue=queue)


def submit(
    code: Submission,
    runtime: str = "python",
    *,
    stdin: str | None = None,
    timeout_ms: int | None = None,
    memory_mb: int | None = None,
    function: str | None = None,
    request_id: str | None = None,
    queue: str | None = None,
    settings: Settings | None = None,
) -> AsyncResult:
    """Upload ``code`` (a file, a folder, or ``{name: content}``) and enqueue a run."""
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    bucket, key = upload_code(code, request_id, settings)
    return enqueue(
        request_id,
        runtime,
        bucket,
        key,
        stdin=stdin,
        timeout_ms=timeout_ms,
        memory_mb=memory_mb,
        function=function,
        queue=queue,
    )


def wait(handle: AsyncResult | str, timeout: float | None = 120) -> ExecutionResult:
    """Block until the run's ExecutionResult is stored in Redis."""
    if isinstance(handle, str):
        handle = AsyncResult(handle, app=app)
    data = handle.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
    return ExecutionResult.from_dict(data)


def run(
    code: Submission, runtime: str = "python", *, wait_timeout: float | None = 120, **options: Any
) -> ExecutionResult:
    """Submit and wait: the simplest way to run code on NanoGrid."""
    return wait(submit(code, runtime, **options), timeout=wait_timeout)
