"""A user's own errback, loaded into the canvas test's worker with ``--include``."""

from __future__ import annotations

from nanogrid_celery.app import app
from nanogrid_celery.common.redis import get_redis
from nanogrid_celery.config import get_settings

ERRBACK_KEY = "nanogrid:test:errback:"


@app.task(name="tests.record_failure")
def record_failure(request, exc, traceback) -> None:
    """New-style errback: called in the worker with the failed task's request and error."""
    get_redis(get_settings().redis_url).set(ERRBACK_KEY + request.id, repr(exc), ex=600)
