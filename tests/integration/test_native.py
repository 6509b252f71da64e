"""Issue 13: ``celery -A nanogrid_celery`` works for everything, with tasks on SQS.

A real worker (SQS broker) on a private events Redis; the celery CLI and
Flower are started with the one app name users know, ``-A nanogrid_celery``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from nanogrid_celery import client
from nanogrid_celery.app import app
from nanogrid_celery.config import get_settings
from nanogrid_celery.result import Status

from .harness import REPO, WorkerProcess
from .test_flower import Process, RedisServer, free_port, wait_for

pytestmark = pytest.mark.integration


def celery_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "nanogrid_celery", *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class NativeFlower(Process):
    """``celery -A nanogrid_celery flower``: no second app name, no --broker."""

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__(
            f"flower-native-{self.port}",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "nanogrid_celery",
                "flower",
                f"--port={self.port}",
                "--address=127.0.0.1",
            ],
            env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method="GET" if body is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=15) as resp:
            text = resp.read().decode()
        return json.loads(text) if path.startswith("/api/") else text


@pytest.fixture(scope="module")
def events_url() -> Iterator[str]:
    """A private events Redis; this process's task-sent events and control calls use it too."""
    redis = RedisServer().start()
    old = os.environ.get("NANOGRID_EVENTS_BROKER_URL")
    os.environ["NANOGRID_EVENTS_BROKER_URL"] = redis.url
    get_settings.cache_clear()
    yield redis.url
    if old is None:
        os.environ.pop("NANOGRID_EVENTS_BROKER_URL", None)
    else:
        os.environ["NANOGRID_EVENTS_BROKER_URL"] = old
    get_settings.cache_clear()
    redis.stop()


@pytest.fixture(scope="module")
def worker(events_url: str) -> Iterator[WorkerProcess]:
    w = WorkerProcess(
        "native", concurrency=1, pool_python=1, pool_cpp=0, events_broker_url=events_url
    ).start()
    w.hostname = f"{w.name}@{socket.gethostname()}"
    yield w
    w.stop()
    for c in w.containers():
        c.remove(force=True)


@pytest.fixture(scope="module")
def flower(worker: WorkerProcess) -> Iterator[NativeFlower]:
    fl = NativeFlower().start()
    try:
        wait_for(lambda: fl.request("/healthcheck") == "OK", 30, "Flower to serve")
        wait_for(lambda: worker.hostname in fl.request("/api/workers?refresh=1"), 30, "the worker")
    except AssertionError:
        fl.stop()
        raise AssertionError(f"Flower never saw the worker:\n{fl.log_tail()}") from None
    yield fl
    fl.stop()


# -- the celery CLI ----------------------------------------------------------------------
def on(worker: WorkerProcess) -> tuple[str, ...]:
    return ("--destination", worker.hostname, "--timeout=5")


def test_celery_inspect_ping_pongs(worker):
    out = celery_cli("inspect", "ping", *on(worker))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pong" in out.stdout and worker.hostname in out.stdout, out.stdout


def test_celery_status_lists_the_worker(worker):
    out = celery_cli("status", "--timeout=5")
    assert out.returncode == 0, out.stdout + out.stderr
    assert worker.hostname in out.stdout and "OK" in out.stdout, out.stdout


def test_celery_inspect_and_control_commands(worker):
    stats = celery_cli("inspect", "stats", *on(worker), "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)[worker.hostname]["pool"]["max-concurrency"] == 1
    registered = celery_cli("inspect", "registered", *on(worker))
    assert "nanogrid.run_code" in registered.stdout, registered.stdout
    active = celery_cli("inspect", "active", *on(worker))
    assert active.returncode == 0 and worker.hostname in active.stdout, active.stdout
    grow = celery_cli("control", "pool_grow", "1", *on(worker))
    assert "pool will grow" in grow.stdout, grow.stdout + grow.stderr
    shrink = celery_cli("control", "pool_shrink", "1", *on(worker))
    assert "pool will shrink" in shrink.stdout, shrink.stdout + shrink.stderr


def test_app_control_and_async_result_from_python(worker):
    assert app.control.ping(destination=[worker.hostname], timeout=3) == [
        {worker.hostname: {"ok": "pong"}}
    ]
    ok = worker.submit({"main.py": "print('fine')"})
    bad = worker.submit({"main.py": "import sys\nsys.exit(4)"})
    assert ok.get(timeout=90)["status"] == "success"
    assert bad.get(timeout=90)["status"] == "error"  # get() does not raise for a failed run
    assert (ok.state, ok.run_status) == ("SUCCESS", "success")
    assert (bad.state, bad.run_status) == ("SUCCESS", "error")
    assert bad.execution_result.exit_code == 4
    assert app.AsyncResult(bad.id).run_status == "error"


def test_celery_events_dump_shows_task_events(worker):
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "nanogrid_celery", "events", "--dump"],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        # a heartbeat means the receiver's queue is bound on the events Redis
        wait_for(lambda: any("heartbeat" in line for line in lines), 30, "a heartbeat")
        result = worker.run({"main.py": "print('evented')"})
        wait_for(lambda: any(result.request_id in ln and "succeeded" in ln for ln in lines), 20, "")
    finally:
        proc.terminate()
        proc.wait(15)
    out = "".join(lines)
    assert f"task succeeded: nanogrid.run_code({result.request_id})" in out, out[-3000:]


# -- Flower started with -A nanogrid_celery ------------------------------------------------
def test_flower_async_apply_runs_nanogrid_run_code(flower, worker):
    bucket, key = client.upload_code({"main.py": "print('from flower')"})
    reply = flower.request(
        "/api/task/async-apply/nanogrid.run_code",
        {"kwargs": {"s3_bucket": bucket, "s3_key": key}, "queue": worker.queue},
    )
    task_id = reply["task-id"]
    result = app.AsyncResult(task_id).get(timeout=90)
    assert result["status"] == "success" and result["stdout"] == "from flower\n", result
    assert result["request_id"] == task_id


def test_a_failed_run_is_visibly_failed_in_flower(flower, worker):
    ok = worker.run({"main.py": "print('ok')"})
    bad = worker.run({"main.py": "raise SystemExit(5)"})
    slow = worker.run({"main.py": "while True: pass"}, timeout_ms=300)
    assert (ok.status, bad.status, slow.status) == (Status.SUCCESS, Status.ERROR, Status.TIMEOUT)

    def states() -> dict[str, Any] | None:
        tasks = flower.request("/api/tasks")
        got = {rid: tasks.get(rid, {}) for rid in (ok.request_id, bad.request_id, slow.request_id)}
        return got if all(t.get("state") in {"SUCCESS", "FAILURE"} for t in got.values()) else None

    tasks = wait_for(states, 30, "the runs in Flower")
    assert tasks[ok.request_id]["state"] == "SUCCESS"
    assert tasks[bad.request_id]["state"] == "FAILURE"
    assert tasks[bad.request_id]["exception"] == "RunFailed('error')"
    assert "'status': 'error'" in tasks[bad.request_id]["result"]
    assert tasks[slow.request_id]["state"] == "FAILURE"
    assert tasks[slow.request_id]["exception"] == "RunFailed('timeout')"
    failed = flower.request("/api/tasks?state=FAILURE")
    assert bad.request_id in failed and ok.request_id not in failed
    # the result API still reads the backend: SUCCESS with the ExecutionResult
    stored = flower.request(f"/api/task/result/{bad.request_id}")
    assert stored["state"] == "SUCCESS" and stored["result"]["status"] == "error"


def test_celery_control_shutdown_stops_the_worker(events_url):
    w = WorkerProcess(
        "shutdown", concurrency=1, pool_python=1, pool_cpp=0, events_broker_url=events_url
    ).start()
    hostname = f"{w.name}@{socket.gethostname()}"
    try:
        # a worker never replies to shutdown (stock Celery neither): the CLI says "No nodes
        # replied" and exits 69; what counts is that the worker stops, cleanly
        celery_cli("control", "shutdown", "--destination", hostname, "--timeout=2")
        assert w.proc is not None and w.proc.wait(60) == 0, w.log_tail()
        assert w.containers() == []  # a clean shutdown: its pool removed
    finally:
        w.stop()
        for c in w.containers():
            c.remove(force=True)
