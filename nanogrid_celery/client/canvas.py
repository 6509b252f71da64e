"""Many runs at once: canvas signatures, and :func:`map` (one group, one upload per code).

A run's signature is *immutable* (``run_code.si``) with the request id as its
task id: in a chain it ignores the previous task's result instead of taking it
as its first argument, and ``AsyncResult(request_id)`` finds it as for
:func:`~nanogrid_celery.client.submit`. Code is uploaded when the signature is
made, once per distinct content within a call (content-addressed keys), so
``map(code, stdins=[...1000 inputs])`` is one upload and 1,000 messages.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from celery import group
from celery.canvas import Signature
from celery.result import GroupResult

from nanogrid_celery.app import app
from nanogrid_celery.config import Settings
from nanogrid_celery.execution.storage import content_addressed_key


def _new_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def run_code_kwargs(
    request_id: str, runtime: str, bucket: str, key: str, **options: Any
) -> dict[str, Any]:
    """The ``run_code`` message for code already in S3 (options left out when None)."""
    return {
        "request_id": request_id,
        "runtime": runtime,
        "s3_bucket": bucket,
        "s3_key": key,
        "submitted_at": time.time(),
        **{k: v for k, v in options.items() if v is not None},
    }


def run_signature(
    bucket: str,
    key: str,
    runtime: str = "python",
    *,
    request_id: str | None = None,
    queue: str | None = None,
    **options: Any,
) -> Signature:
    """An immutable ``nanogrid.run_code`` signature for code already in S3."""
    request_id = request_id or _new_id()
    kwargs = run_code_kwargs(request_id, runtime, bucket, key, **options)
    opts: dict[str, Any] = {"task_id": request_id}
    if queue:
        opts["queue"] = queue
    return app.signature("nanogrid.run_code", kwargs=kwargs, options=opts, immutable=True)


class _Uploads:
    """One upload per distinct code content within a call."""

    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings
        self.by_content: dict[str, tuple[str, str]] = {}
        self.by_object: dict[int, tuple[str, str]] = {}
        self.count = 0

    def __call__(self, code: Any) -> tuple[str, str]:
        from nanogrid_celery.client import _package, upload_code

        if id(code) in self.by_object:
            return self.by_object[id(code)]
        name, data = _package(code)
        content = content_addressed_key(data, name)
        if content not in self.by_content:
            self.by_content[content] = upload_code(code, settings=self.settings)
            self.count += 1
        self.by_object[id(code)] = self.by_content[content]
        return self.by_content[content]


def signature(
    code: Any, runtime: str = "python", *, settings: Settings | None = None, **options: Any
) -> Signature:
    """Upload ``code``; its run's signature (options: ``stdin``, ``timeout_ms``, ``queue``...)."""
    return run_signature(*_Uploads(settings)(code), runtime, **options)


def signatures(
    code: Any,
    stdins: Iterable[str | None] | None = None,
    runtime: str = "python",
    *,
    settings: Settings | None = None,
    **options: Any,
) -> list[Signature]:
    """Signatures for many runs: one code for each stdin, or each code of a list (zipped
    with ``stdins`` if given). A list or tuple is many submissions; a path or a
    ``{name: content}`` mapping is one."""
    many = isinstance(code, (list, tuple))
    inputs = None if stdins is None else list(stdins)
    if many:
        codes: Sequence[Any] = list(code)
        if inputs is not None and len(inputs) != len(codes):
            raise ValueError(f"{len(codes)} submissions but {len(inputs)} stdins")
    else:
        if inputs is None:
            raise ValueError("one submission needs stdins=[...] (or pass a list of submissions)")
        codes = [code] * len(inputs)
    uploads = _Uploads(settings)
    stdin_list = inputs if inputs is not None else [None] * len(codes)
    options.pop("stdin", None)
    options.pop("request_id", None)  # each run gets its own
    return [
        run_signature(*uploads(c), runtime, stdin=s, **options)
        for c, s in zip(codes, stdin_list, strict=True)
    ]


def map(
    code: Any,
    stdins: Iterable[str | None] | None = None,
    runtime: str = "python",
    **options: Any,
) -> GroupResult:
    """Submit many runs as one Celery group; ``.get()`` returns the result dicts in order."""
    return group(signatures(code, stdins, runtime, **options)).apply_async()
