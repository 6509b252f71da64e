"""Issue 13: ``nanogrid watch`` waits through silence and a Redis restart, and filters.

A real worker publishes its results to a private redis-server (its
``NANOGRID_REDIS_URL``), which this test stops and starts again on the same
port; the shared Redis is never touched. The watcher runs with a 5 s socket
timeout through 20 s of silence: the old loop died after ~10 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from nanogrid_celery.result import Status

from .harness import REPO, WorkerProcess
from .test_flower import RedisServer, wait_for

pytestmark = pytest.mark.integration


class Watch:
    """``nanogrid watch`` as a subprocess; its stdout lines are collected by a thread."""

    def __init__(self, redis_url: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanogrid_celery.cli", "watch", "--socket-timeout=5", *args],
            cwd=REPO,
            env={**os.environ, "NANOGRID_REDIS_URL": redis_url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        threading.Thread(
            target=self._read, args=(self.proc.stdout, self.lines), daemon=True
        ).start()
        threading.Thread(
            target=self._read, args=(self.proc.stderr, self.errors), daemon=True
        ).start()

    @staticmethod
    def _read(pipe, into: list[str]) -> None:
        for line in pipe:
            into.append(line)

    def saw(self, request_id: str) -> bool:
        return any(request_id in line for line in self.lines)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer) -> Iterator[WorkerProcess]:
    w = WorkerProcess(
        "watch", concurrency=1, pool_python=1, pool_cpp=0, redis_url=redis_server.url
    ).start()
    yield w
    w.stop()
    for c in w.containers():
        c.remove(force=True)


@pytest.fixture(scope="module")
def watch(redis_server: RedisServer, worker: WorkerProcess) -> Iterator[Watch]:
    w = Watch(redis_server.url, "--status", "error,timeout")
    time.sleep(1.5)  # it pins the stream position when it connects
    yield w
    w.stop()


def test_watch_survives_silence_and_filters_by_status(watch, worker):
    time.sleep(20)  # four socket timeouts of silence
    assert watch.proc.poll() is None, "".join(watch.errors)
    ok = worker.run({"main.py": "print('fine')"})
    bad = worker.run({"main.py": "raise SystemExit(2)"})
    assert (ok.status, bad.status) == (Status.SUCCESS, Status.ERROR)
    wait_for(lambda: watch.saw(bad.request_id), 20, "the failed run in watch")
    assert not watch.saw(ok.request_id)  # --status error,timeout
    assert "error" in next(line for line in watch.lines if bad.request_id in line)
    assert not any("Timeout reading" in e for e in watch.errors), watch.errors


def test_watch_reconnects_after_a_redis_restart(watch, worker, redis_server):
    redis_server.stop()
    time.sleep(3)
    assert watch.proc.poll() is None, "".join(watch.errors)
    redis_server.start()  # same port, empty (no persistence)
    wait_for(lambda: worker.run({"main.py": "x"}).status == Status.ERROR, 60, "the worker", step=1)
    after = worker.run({"main.py": "raise SystemExit(3)"})
    wait_for(lambda: watch.saw(after.request_id), 30, "a run after the restart in watch")
    assert any("retrying" in e for e in watch.errors), watch.errors
    assert watch.proc.poll() is None
