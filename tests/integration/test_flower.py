"""Issue #6: Flower works with an SQS broker - in its API and in a real (headless) browser.

A real worker (SQS broker) sends its events and answers remote control over a
private Redis. Flower runs here under the old app name with ``--broker`` pointing
at that Redis, which keeps that alias tested; ``make up``, docker-compose.yml and
tests/integration/test_native.py start it as ``celery -A nanogrid_celery flower``
with ``NANOGRID_EVENTS_BROKER_URL``. Chromium (Debian's ``chromium``,
installed by scripts/bootstrap.sh) renders the pages; screenshots land in .run/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from nanogrid_celery.config import get_settings
from nanogrid_celery.result import Status

from .harness import LOG_DIR, REPO, WorkerProcess

pytestmark = pytest.mark.integration

SCREENSHOTS = REPO / ".run"
SLEEPER = {"main.py": "import time\ntime.sleep(4)\nprint('slept')\n"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
        except Exception as exc:  # the thing is still coming up
            value, last = None, exc
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


class Process:
    """A service subprocess with its own log under .run/test-logs."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self.argv, self.env = argv, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])


class Flower(Process):
    def __init__(self, broker: str) -> None:
        self.port = free_port()
        super().__init__(
            f"flower-{self.port}",
            # --broker is a celery option: before `flower`, as in scripts/stack.sh
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "nanogrid_celery.monitoring.app",
                f"--broker={broker}",
                "flower",
                f"--port={self.port}",
                "--address=127.0.0.1",
            ],
            env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=15) as resp:
            body = resp.read().decode()
        return json.loads(body) if path.startswith("/api/") else body

    def post(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=15) as resp:
            return json.loads(resp.read().decode())


class RedisServer(Process):
    """A private redis-server for events and remote control (the shared one is never stopped)."""

    def __init__(self) -> None:
        self.port = free_port()
        binary = shutil.which("redis-server") or "redis-server"
        super().__init__(
            f"redis-events-{self.port}",
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        super().start()
        wait_for(lambda: not _port_closed(self.port), 10, "redis-server")
        return self


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def events_redis() -> Iterator[RedisServer]:
    redis = RedisServer().start()
    # The client side (task-sent events from this process) uses the same Redis.
    old = os.environ.get("NANOGRID_EVENTS_BROKER_URL")
    os.environ["NANOGRID_EVENTS_BROKER_URL"] = redis.url
    get_settings.cache_clear()
    yield redis
    if old is None:
        os.environ.pop("NANOGRID_EVENTS_BROKER_URL", None)
    else:
        os.environ["NANOGRID_EVENTS_BROKER_URL"] = old
    get_settings.cache_clear()
    redis.stop()


@pytest.fixture(scope="module")
def events_url(events_redis: RedisServer) -> str:
    return events_redis.url


@pytest.fixture(scope="module")
def worker(events_url: str) -> Iterator[WorkerProcess]:
    w = WorkerProcess(
        "flower", concurrency=1, pool_python=1, pool_cpp=0, events_broker_url=events_url
    ).start()
    w.hostname = f"{w.name}@{socket.gethostname()}"
    yield w
    w.stop()
    leftovers = w.containers()
    for c in leftovers:  # ours by instance label; removed so a failure leaves nothing behind
        c.remove(force=True)
    assert leftovers == [], "worker shutdown left containers behind"


@pytest.fixture(scope="module")
def flower(events_url: str, worker: WorkerProcess) -> Iterator[Flower]:
    fl = Flower(events_url).start()
    try:
        wait_for(lambda: fl.get("/healthcheck") == "OK", 30, "Flower to serve")
        # Remote control over Redis: Flower's worker list comes from inspect replies.
        wait_for(lambda: worker.hostname in fl.get("/api/workers?refresh=1"), 30, "the worker")
    except AssertionError:
        fl.stop()
        raise AssertionError(f"Flower never saw the worker:\n{fl.log_tail()}") from None
    yield fl
    fl.stop()


@pytest.fixture(scope="module")
def submissions(worker: WorkerProcess, flower: Flower) -> dict[str, Any]:
    """Three runs made while Flower watches: two succeed, one exits 3."""
    results = [worker.run({"main.py": f"print({i} * 7)"}) for i in range(2)]
    results.append(worker.run({"main.py": "import sys\nsys.exit(3)"}))
    assert [r.status for r in results] == [Status.SUCCESS, Status.SUCCESS, Status.ERROR]
    ids = [r.request_id for r in results]

    def all_done() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks")
        if all(tasks.get(i, {}).get("state") in {"SUCCESS", "FAILURE"} for i in ids):
            return tasks
        return None

    return {"ids": ids, "tasks": wait_for(all_done, 30, "the runs in Flower")}


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed; run scripts/bootstrap.sh (it installs it)")
    argv = [
        binary,
        "--headless",
        "--no-sandbox",  # we run as root in CI
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,900",
        "--virtual-time-budget=5000",  # the task table is filled by an AJAX call
        *args,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


# -- tests -----------------------------------------------------------------------------------
def test_flower_api_lists_each_run_with_its_state_args_and_result(submissions, worker):
    tasks = submissions["tasks"]
    # the run's status decides the state Flower shows (monitoring/run_state.py); get() never raises
    expected = {"SUCCESS": "succeeded", "FAILURE": "failed"}
    for rid, state in zip(submissions["ids"], ["SUCCESS", "SUCCESS", "FAILURE"], strict=True):
        task = tasks[rid]
        assert task["name"] == "nanogrid.run_code"
        assert task["state"] == state, task
        assert task["worker"] == worker.hostname
        assert rid in task["kwargs"]  # args as Celery's kwargsrepr
        assert rid in task["result"]
        # task-sent comes from the client (after_task_publish -> Redis), the rest from the worker
        done = expected[state]
        for stamp in ("sent", "received", "started", done):
            assert task[stamp], f"{rid} has no {stamp} time: {task}"
        # (sent is stamped after the SQS publish returns, so a fast worker may beat it)
        assert task["received"] <= task["started"] <= task[done]
        assert task["sent"] <= task[done]
    failed = tasks[submissions["ids"][2]]
    assert "'status': 'error'" in failed["result"]
    assert failed["exception"] == "RunFailed('error')"


def test_flower_api_shows_the_worker_with_stats_and_heartbeats(flower, worker, submissions):
    info = flower.get("/api/workers?refresh=1")[worker.hostname]
    assert info["stats"]["pool"]["max-concurrency"] == 1
    assert "nanogrid.run_code" in info["registered"]
    assert [q["name"] for q in info["active_queues"]] == [worker.queue]
    # heartbeats keep the worker online in Flower's event state (dashboard)
    page = flower.get("/workers")
    assert worker.hostname in page


def test_remote_control_over_redis_ping_inspect_and_pool_size(flower, worker, events_url):
    control = Celery("probe", broker=events_url)
    control.conf.accept_content = ["json"]
    replies = control.control.ping(destination=[worker.hostname], timeout=3)
    assert replies == [{worker.hostname: {"ok": "pong"}}]

    handle = worker.submit(SLEEPER)

    def running() -> bool:
        active = control.control.inspect([worker.hostname], timeout=2).active() or {}
        return any(t["id"] == handle.id for t in active.get(worker.hostname, []))

    wait_for(running, 30, "the sleeping run in `inspect active`")
    assert handle.get(timeout=60)["stdout"] == "slept\n"

    def processes() -> int:
        info = flower.get(f"/api/workers?refresh=1&workername={worker.hostname}")
        return len(info[worker.hostname]["stats"]["pool"]["processes"])

    assert processes() == 1
    assert "grow" in flower.post(f"/api/worker/pool/grow/{worker.hostname}?n=1")["message"].lower()
    wait_for(lambda: processes() == 2, 30, "the pool to grow to 2")
    flower.post(f"/api/worker/pool/shrink/{worker.hostname}?n=1")
    wait_for(lambda: processes() == 1, 30, "the pool to shrink to 1")
    control.close()


def test_flower_pages_in_headless_chromium(flower, worker, submissions, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    tasks_dom = chromium("--dump-dom", f"{flower.url}/tasks", tmp_path=tmp_path).stdout
    assert tasks_dom.count("nanogrid.run_code") >= len(submissions["ids"])
    for rid in submissions["ids"]:
        assert rid in tasks_dom, f"{rid} not on the tasks page"
    assert worker.hostname in tasks_dom

    workers_dom = chromium("--dump-dom", f"{flower.url}/workers", tmp_path=tmp_path).stdout
    assert worker.hostname in workers_dom
    assert "Online" in workers_dom

    for page in ("tasks", "workers"):
        shot = SCREENSHOTS / f"flower-{page}.png"
        shot.unlink(missing_ok=True)
        chromium(f"--screenshot={shot}", f"{flower.url}/{page}", tmp_path=tmp_path)
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, shot


def test_runs_go_on_while_the_events_redis_is_down(flower, worker, events_redis):
    """Monitoring is an observer: losing its Redis never fails or stalls a run; it recovers."""
    events_redis.stop()
    t0 = time.monotonic()
    result = worker.run({"main.py": "print('no monitoring')"}, wait=60)
    assert result.status == Status.SUCCESS, result
    assert time.monotonic() - t0 < 30  # generous: no reconnect storm in the run path
    assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()

    events_redis.start()  # same port: worker and Flower reconnect on their own
    control = Celery("probe", broker=events_redis.url)
    control.conf.accept_content = ["json"]
    ping = lambda: control.control.ping(destination=[worker.hostname], timeout=2)  # noqa: E731
    wait_for(ping, 60, "remote control to reconnect", step=1)
    control.close()
    after = worker.run({"main.py": "print('monitored again')"})
    assert after.status == Status.SUCCESS, after

    def in_flower() -> bool:
        return flower.get("/api/tasks").get(after.request_id, {}).get("state") == "SUCCESS"

    wait_for(in_flower, 60, "the run after the outage in Flower", step=1)


def _port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return True
    return False
