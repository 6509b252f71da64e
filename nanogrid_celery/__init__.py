"""NanoGrid: run untrusted Python and C++ from SQS in warm, isolated Docker sandboxes."""

from .app import app

__all__ = ["app"]
