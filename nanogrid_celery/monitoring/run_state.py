"""The run's own outcome in Celery's task events, so Flower shows failed runs as failed.

``run_code`` never raises: every run ends as an ExecutionResult, stored as the
task's SUCCESS result, so ``AsyncResult.get()`` returns it and never raises for
a program that merely crashed. That left Flower (and ``celery events``) listing
every run as SUCCESS. Flower derives a task's state only from task events, and
its state machine lets SUCCESS win over any later or custom event (celery's
``events/state.py`` precedence), so a status can only show if the worker does
not send ``task-succeeded`` for a failed run. :class:`RunStateRequest` (the
task's ``Request`` class, in the worker's main process) does exactly that:

* run status ``success``: ``task-succeeded``, as before, plus ``run_status``;
* any other status: ``task-failed`` with ``exception="RunFailed('<status>')"``,
  an empty traceback, the result repr and runtime, and ``run_status`` - Flower
  shows FAILURE (filterable with ``?state=FAILURE``) and the result, and counts
  it in the worker's *failed* column.

Only the events change: the result backend still says SUCCESS with the dict,
acks and ``task_success`` signals are untouched. The main process sees the
child's return value only as Celery's ``saferepr`` string (cut at 1024
characters); ``status`` is the dict's third key, so it is always in it.
"""

from __future__ import annotations

import re
from typing import Any

from celery.worker.request import Request

_STATUS = re.compile(r"'status': '([a-z_]+)'")
SUCCESS = "success"


def status_from_repr(text: Any) -> str | None:
    """The run status in the repr of an ExecutionResult dict, or None if it is not one."""
    if not isinstance(text, str):
        return None
    match = _STATUS.search(text)
    return match.group(1) if match else None


def failed_event_fields(status: str, fields: dict[str, Any]) -> dict[str, Any]:
    """``task-failed`` fields for a run whose status is not success."""
    return {
        **fields,
        "exception": f"RunFailed('{status}')",
        "traceback": "",
        "run_status": status,
    }


class RunStateRequest(Request):
    """Celery's Request; a finished run's event carries its status (see the module doc)."""

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-succeeded":
            status = status_from_repr(fields.get("result"))
            if status is not None and status != SUCCESS:
                return super().send_event("task-failed", **failed_event_fields(status, fields))
            if status is not None:
                fields["run_status"] = status
        return super().send_event(type, **fields)
