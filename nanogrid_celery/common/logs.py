"""Structured logging: every line of a run names its request id.

The id lives in a ContextVar set by the task, so modules log normally and the
filter stamps it on; ``NANOGRID_LOG_JSON=1`` switches to one JSON object per line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

from celery._state import get_current_task

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id(record)
        return True


def _request_id(record: logging.LogRecord) -> str:
    """Ours if set; else Celery's own lines: the running task, or the task a line is about.

    The task id is the request id (the client sends it as ``task_id``), so Celery's
    "Task nanogrid.run_code[<id>] received" line in the main process is stamped too.
    """
    rid = request_id_var.get()
    if rid != "-":
        return rid
    task = get_current_task()  # e.g. celery.app.trace lines in the child, around the task
    if task is not None and isinstance(task.request.id, str):
        return task.request.id
    for ctx in (getattr(record, "data", None), record.args):
        if isinstance(ctx, Mapping) and isinstance(ctx.get("id"), str):
            return ctx["id"]
    return "-"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            data.update(extra)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extra = getattr(record, "fields", None)
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return base


def configure(json_lines: bool, level: str = "INFO") -> None:
    """Install the request-id filter and formatter on the root handlers (Celery's included)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    fmt: logging.Formatter
    if json_lines:
        fmt = JsonFormatter()
    else:
        fmt = KeyValueFormatter(
            "%(asctime)s %(levelname)s %(name)s pid=%(process)d [req=%(request_id)s] %(message)s"
        )
    for handler in root.handlers:
        handler.setFormatter(fmt)
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
    root.setLevel(level)
    # Celery's "Task succeeded: <whole result>" line repeats our own "run finished" line
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


class StructLogger(logging.LoggerAdapter):
    """A logger whose keyword arguments are structured fields: ``log.info("msg", container=id)``.

    Fields render as ``key=value`` (or JSON keys with ``NANOGRID_LOG_JSON=1``)
    after the message; the request id is stamped by :class:`RequestIdFilter`.
    ``exc_info``, ``stack_info``, ``stacklevel`` and ``extra`` keep their
    logging meaning.
    """

    _LOGGING_KWARGS = frozenset({"exc_info", "stack_info", "stacklevel", "extra"})

    def process(self, msg: object, kwargs: dict) -> tuple[object, dict]:
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k not in self._LOGGING_KWARGS}
        if fields:
            extra = dict(kwargs.get("extra") or {})
            extra["fields"] = {**extra.get("fields", {}), **fields}
            kwargs["extra"] = extra
        return msg, kwargs


def get_logger(name: str) -> StructLogger:
    """The module's logger; every module logs through this (see :class:`StructLogger`)."""
    return StructLogger(logging.getLogger(name), {})
