"""The ``run_code`` task: a thin shell around :class:`Runner`, run once per request id."""

from __future__ import annotations

import time
from typing import Any

from nanogrid_celery.app import app
from nanogrid_celery.common.logs import request_context
from nanogrid_celery.delivery.idempotency import run_once
from nanogrid_celery.execution.runner import RunRequest
from nanogrid_celery.service.worker import get_runner


@app.task(
    name="nanogrid.run_code",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    # task events carry the run's status: a failed run is FAILURE in Flower (run_state.py)
    Request="nanogrid_celery.monitoring.run_state:RunStateRequest",
)
def run_code(
    self,
    request_id: str | None = None,
    runtime: str = "python",
    s3_bucket: str = "",
    s3_key: str = "",
    stdin: str | None = None,
    timeout_ms: int | None = None,
    memory_mb: int | None = None,
    submitted_at: float | None = None,
    function: str | None = None,
    callback_url: str | None = None,
    stdin_s3_key: str | None = None,
    cases: list[dict[str, Any]] | None = None,
    cases_s3_key: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Run the code at ``s3://s3_bucket/s3_key``; returns an ExecutionResult as a dict.

    ``callback_url``: the worker POSTs the result there, signed (delivery/callbacks.py).
    ``cases`` makes it a test-case batch (execution/batch.py); ``stdin_s3_key`` /
    ``cases_s3_key`` name large inputs uploaded beside the code (execution/inputs.py).
    """
    received_at = time.time()
    request_id = request_id or self.request.id
    with request_context(request_id):
        req = RunRequest(
            request_id=request_id,
            runtime=runtime,
            s3_bucket=s3_bucket,
            s3_key=s3_key,
            stdin=stdin,
            timeout_ms=timeout_ms,
            memory_mb=memory_mb,
            submitted_at=submitted_at,
            function=function,
            callback_url=callback_url,
            stdin_s3_key=stdin_s3_key,
            cases=cases,
            cases_s3_key=cases_s3_key,
        )
        return run_once(
            self, request_id, str(runtime), lambda: get_runner().execute(req, received_at).to_dict()
        )
