"""Small tasks for Celery canvas over runs: ``group``, ``chord``, ``chain``, ``link``.

``run_code`` returns an ExecutionResult dict and never raises, so canvas works
on runs as on any task (see docs/canvas.md):

* ``nanogrid.summarize`` - a chord callback (or ``link``) over run results:
  counts by status, the ids that did not succeed, total run time;
* ``nanogrid.check`` - passes a successful result on and raises
  :class:`RunFailed` otherwise, so a chain stops and its ``link_error`` fires
  on a failed *run* - opt-in, because the task itself never fails.

Both run on the NanoGrid worker that finished the last run (they are plain
Python, no sandbox) and are registered with the app, so nothing else needs
deploying. Use ``run_code.si(...)`` (immutable) in chains: a mutable
signature would receive the previous result as its first argument.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from nanogrid_celery.app import app


class RunFailed(Exception):
    """A run ended with a status other than success (raised by ``nanogrid.check``)."""

    def __init__(self, request_id: str, status: str, message: str = "") -> None:
        super().__init__(request_id, status, message)
        self.request_id, self.status, self.message = request_id, status, message

    def __str__(self) -> str:
        return f"run {self.request_id} ended {self.status}" + (
            f": {self.message}" if self.message else ""
        )


def summary(results: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """What ``nanogrid.summarize`` returns for one result or a list of them."""
    items = [results] if isinstance(results, dict) else list(results or [])
    statuses = Counter(str(r.get("status")) for r in items)
    return {
        "total": len(items),
        "by_status": dict(statuses),
        "ok": statuses.get("success", 0) == len(items),
        "request_ids": [r.get("request_id") for r in items],
        "not_ok": [r.get("request_id") for r in items if r.get("status") != "success"],
        "duration_ms": round(sum(r.get("duration_ms") or 0 for r in items), 3),
    }


@app.task(name="nanogrid.summarize")
def summarize(results: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """Chord callback / link over run results: see :func:`summary`."""
    return summary(results)


@app.task(name="nanogrid.check")
def check(result: dict[str, Any]) -> dict[str, Any]:
    """The result if the run succeeded; raise :class:`RunFailed` (fails the chain) otherwise."""
    if result.get("status") != "success":
        raise RunFailed(
            str(result.get("request_id")), str(result.get("status")), result.get("message") or ""
        )
    return result
