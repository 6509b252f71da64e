"""Fixtures that start real workers against moto SQS/S3, Redis and Docker."""

from __future__ import annotations

import pytest

from .harness import WorkerProcess


@pytest.fixture(scope="session")
def worker():
    """One worker process, one python and one cpp container: runs land on the same container."""
    w = WorkerProcess("main", concurrency=1, pool_python=1, pool_cpp=1).start()
    yield w
    w.stop()
    assert w.containers() == [], "worker shutdown left containers behind"


@pytest.fixture
def run(worker):
    return worker.run
