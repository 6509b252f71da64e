"""NanoGrid: run untrusted Python and C++ from SQS in warm, isolated Docker sandboxes."""

from nanogrid_celery import canvas as _canvas  # noqa: F401 - registers nanogrid.* tasks, so
from nanogrid_celery import tasks as _tasks  # noqa: F401 - Flower and clients can apply them
from nanogrid_celery.app import app
from nanogrid_celery.result import ExecutionResult, Status

__all__ = ["ExecutionResult", "Status", "app"]
