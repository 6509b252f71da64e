"""NanoGrid: run untrusted Python and C++ from SQS in warm, isolated Docker sandboxes."""

from nanogrid_celery.app import app
from nanogrid_celery.result import ExecutionResult, Status

__all__ = ["ExecutionResult", "Status", "app"]
