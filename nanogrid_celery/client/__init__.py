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

from nanogrid_celery.app import app
from nanogrid_celery.client.canvas import run_code_kwargs
from nanogrid_celery.config import Settings, get_settings
from nanogrid_celery.execution.inputs import check_inputs, prepare_inputs
from nanogrid_celery.execution.storage import content_addressed_key, ensure_bucket, upload
from nanogrid_celery.result import ExecutionResult

Submission = str | Path | Mapping[str, bytes | str]


@lru_cache(maxsize=8)
def _bucket_ready(settings: Settings) -> str:
    return ensure_bucket(settings)


def _zip(files: Mapping[str, bytes | str]) -> bytes:
    """A deterministic zip (sorted names, fixed timestamps): same code, same bytes, same key."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            content = files[name]
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, content.encode() if isinstance(content, str) else content)
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


_UPLOADED: dict[tuple[str, str], float] = {}
UPLOAD_MEMO_SECONDS = 300.0


def upload_code(
    code: Submission, request_id: str | None = None, settings: Settings | None = None
) -> tuple[str, str]:
    """Put the code in S3 under a key named by its SHA-256; returns (bucket, key).

    The key names its bytes (``code/sha256-<hex>/<name>``), so the same function
    submitted again is neither uploaded again by this process (for a few
    minutes) nor downloaded again by a worker that has it cached: FaaS traffic
    is mostly the same code with new input.
    """
    settings = settings or get_settings()
    bucket = _bucket_ready(settings)
    name, data = _package(code)
    key = content_addressed_key(data, name)
    now = time.monotonic()
    if now - _UPLOADED.get((bucket, key), -UPLOAD_MEMO_SECONDS) >= UPLOAD_MEMO_SECONDS:
        upload(settings, key, data, bucket)
        if len(_UPLOADED) > 10_000:
            _UPLOADED.clear()
        _UPLOADED[(bucket, key)] = now
    return bucket, key


def enqueue(
    request_id: str, runtime: str, bucket: str, key: str, queue: str | None = None, **options: Any
) -> AsyncResult:
    """Send ``run_code`` for code already in S3 (``options``: stdin, timeout_ms, memory_mb)."""
    kwargs = run_code_kwargs(request_id, runtime, bucket, key, **options)
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
    callback_url: str | None = None,
    cases: list[dict[str, Any]] | None = None,
) -> AsyncResult:
    """Upload ``code`` (a file, a folder, or ``{name: content}``) and enqueue a run.

    ``callback_url``: the worker POSTs the signed result there (docs/callbacks.md).
    ``cases`` (a list of ``{"stdin", "expected_stdout", "timeout_ms", "memory_mb"}``)
    runs the code once per case (``result.cases``). A stdin or cases document above
    ``NANOGRID_INPUT_INLINE_MAX_BYTES`` goes up to S3 beside the code; one over its
    documented maximum raises :class:`RunRejected` before anything is uploaded or sent.
    """
    settings = settings or get_settings()
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    check_inputs(settings, stdin, cases)  # refuse before uploading anything
    bucket, key = upload_code(code, request_id, settings)
    inputs = prepare_inputs(settings, bucket, stdin, cases)
    return enqueue(
        request_id,
        runtime,
        bucket,
        key,
        **inputs,
        timeout_ms=timeout_ms,
        memory_mb=memory_mb,
        function=function,
        queue=queue,
        callback_url=callback_url,
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


# canvas: signatures, map (many runs, one upload per distinct code)
from nanogrid_celery.client.canvas import map, signature, signatures  # noqa: E402, F401
