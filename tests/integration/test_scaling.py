"""Demand-sized warm pools on a ``-P threads`` worker: grow to the burst, decay after the TTL.

A threads worker runs many tasks in one process, so one pool serves them all;
it must keep what the last burst needed instead of cold-starting most of every
burst (21-26 of 48 before), and shrink back to its minimum once idle.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import Celery

from nanogrid_celery import client

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

SLEEP = {"main.py": "import time\ntime.sleep(1)\nprint('done')\n"}
THREADS = 6
BURST = 12
TTL_S = 6


@pytest.fixture(scope="module")
def threaded():
    w = WorkerProcess(
        "threads",
        concurrency=THREADS,
        pool="threads",
        pool_python=1,
        pool_cpp=0,
        pool_idle_ttl_s=TTL_S,
        events_broker_url="redis://127.0.0.1:6379/1",
    ).start()
    w.hostname = f"{w.name}@{socket.gethostname()}"
    yield w
    w.stop()
    assert w.containers() == [], "worker shutdown left containers behind"


def _burst(worker: WorkerProcess, n: int) -> list:
    handles = [worker.submit(SLEEP) for _ in range(n)]
    with ThreadPoolExecutor(8) as ex:
        return list(ex.map(lambda h: client.wait(h, timeout=120), handles))


def _stats(worker: WorkerProcess) -> dict:
    control = Celery("probe", broker="redis://127.0.0.1:6379/1")
    control.conf.accept_content = ["json"]
    try:
        replies = control.control.inspect([worker.hostname], timeout=5).stats() or {}
    finally:
        control.close()
    return replies[worker.hostname]["nanogrid"]["pools"]["python"]


def test_bursts_after_the_first_start_warm_and_idle_decays(threaded):
    colds = []
    for _ in range(3):
        results = _burst(threaded, BURST)
        assert all(r.status == "success" and r.stdout == "done\n" for r in results)
        colds.append(sum(r.start == "cold" for r in results))
    assert colds[0] >= 1, "the first burst needs more containers than the minimum"
    assert max(colds[1:]) <= 2, f"cold starts per burst: {colds}"
    stats = _stats(threaded)
    assert stats["target"] >= THREADS - 1 and stats["max"] == THREADS
    assert stats["cold"] == sum(colds) and stats["grown"] >= 1

    deadline = time.monotonic() + TTL_S * 4
    while time.monotonic() < deadline:
        if len(threaded.containers()) == 1:
            break
        time.sleep(0.5)
    assert len(threaded.containers()) == 1, "idle for the TTL: back to the minimum"
    assert _stats(threaded)["shrunk"] >= 1
