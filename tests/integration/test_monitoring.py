"""Issue #6: the worker's Prometheus endpoint and its JSON logs, from a real worker."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanogrid_celery.result import Status

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

HELLO_CPP = '#include <iostream>\nint main(){ std::cout << "hi" << std::endl; }\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scrape:
    """One scrape of ``/metrics``: sample value by name and labels."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture(scope="module")
def metrics_worker() -> Iterator[WorkerProcess]:
    """Two prefork children (the endpoint sums them), a warm python pool and no cpp pool."""
    port = free_port()
    w = WorkerProcess(
        "metrics", concurrency=2, pool_python=1, pool_cpp=0, metrics_port=port
    ).start()
    w.metrics_port = port
    yield w
    w.stop()
    assert w.containers() == [], "worker shutdown left containers behind"


def test_metrics_endpoint_counts_runs_latencies_and_pool(metrics_worker):
    w = metrics_worker
    before = Scrape(w.metrics_port)
    assert before.value("nanogrid_runs_total") == 0

    results = [
        w.run({"main.py": "print('ok')"}),
        w.run({"main.py": "print('ok again')"}),
        w.run({"main.py": "import sys; sys.exit(2)"}),
        # no cpp pool: a cold start; fresh source so the host's build cache cannot answer it
        w.run({"main.cpp": HELLO_CPP + f"// {uuid.uuid4().hex}\n"}, "cpp"),
        w.run({"main.py": "print('never')"}, timeout_ms=0),  # rejected by the worker
    ]
    assert [r.status for r in results] == [
        Status.SUCCESS,
        Status.SUCCESS,
        Status.ERROR,
        Status.SUCCESS,
        Status.REJECTED,
    ]
    assert {r.worker for r in results[:4]}  # ran on this worker's children
    after = Scrape(w.metrics_port)

    runs = "nanogrid_runs_total"
    assert after.value(runs, runtime="python", status="success") == 2
    assert after.value(runs, runtime="python", status="error") == 1
    assert after.value(runs, runtime="python", status="rejected") == 1
    assert after.value(runs, runtime="cpp", status="success") == 1
    starts = "nanogrid_container_starts_total"
    assert after.value(starts, runtime="python", start="warm") == 3
    assert after.value(starts, runtime="cpp", start="cold") == 1
    assert after.value("nanogrid_queue_wait_seconds_count") == 5  # rejected runs waited too
    assert after.value("nanogrid_run_seconds_count", runtime="python") == 3
    assert after.value("nanogrid_compile_seconds_count", runtime="cpp") == 1
    assert after.value("nanogrid_request_seconds_count") == 5
    cold = after.value("nanogrid_container_start_seconds_sum", runtime="cpp", start="cold")
    warm_n = after.value("nanogrid_container_start_seconds_count", runtime="python", start="warm")
    warm = after.value("nanogrid_container_start_seconds_sum", runtime="python", start="warm")
    assert warm_n == 3 and warm > 0 and cold > 0  # measured, not asserted: see benchmarks
    # the run histogram's +Inf bucket holds every observation
    assert after.value("nanogrid_run_seconds_bucket", runtime="python", le="+Inf") == 3

    # Pool gauges are summed over both children: one paused python container each.
    def pool_settled() -> Scrape | None:
        s = Scrape(w.metrics_port)
        ok = s.value("nanogrid_pool_containers", runtime="python", state="idle") == 2
        return s if ok and s.value("nanogrid_pool_containers", state="busy") == 0 else None

    settled = _wait(pool_settled, 20)
    assert settled.value("nanogrid_pool_target", runtime="python") == 2
    assert settled.value("nanogrid_pool_target", runtime="cpp") == 0

    # Counters keep moving with more runs.
    w.run({"main.py": "print(1)"})
    again = Scrape(w.metrics_port)
    assert again.value(runs, runtime="python", status="success") == 3


def test_json_logs_stamp_the_request_id_on_every_line_of_a_run():
    """Celery's own lines (main process) and third-party lines (child) included."""
    w = WorkerProcess("logs", concurrency=1, pool_python=1, pool_cpp=0, log_json=1)
    w.env["NANOGRID_LOG_LEVEL"] = "DEBUG"  # botocore/urllib3/docker lines during the run
    w.start()
    try:
        result = w.run({"main.py": "print('logged')"})
        assert result.status == Status.SUCCESS, result
        rid = result.request_id
        time.sleep(0.5)  # the main process logs the task's end after the result is stored
    finally:
        w.stop()
    lines = [json.loads(line) for line in w.log_path.read_text().splitlines() if line[:1] == "{"]
    assert lines, w.log_tail()
    ours = [ln for ln in lines if ln["request_id"] == rid]
    # Celery's own "Task nanogrid.run_code[<id>] received" line, in the main process
    received = [ln for ln in ours if ln["logger"] == "celery.worker.strategy"]
    assert received and rid in received[0]["msg"]
    # Every line at INFO and above that names the run carries its id. (At DEBUG, the main
    # process's "TaskPool: Apply <args>" line does not: the id is only inside a repr there.)
    for ln in lines:
        if rid in ln["msg"] and ln["level"] != "DEBUG":
            assert ln["request_id"] == rid, ln
    # In the child, every line between the run's first and its "run finished" is stamped -
    # ours and third-party libraries' alike.
    finished = next(ln for ln in ours if ln["msg"] == "run finished")
    child = finished["pid"]
    first = next(i for i, ln in enumerate(lines) if ln["pid"] == child and ln["request_id"] == rid)
    last = lines.index(finished)
    during = [ln for ln in lines[first : last + 1] if ln["pid"] == child]
    unstamped = [ln for ln in during if ln["request_id"] != rid]
    assert unstamped == [], unstamped[:5]
    loggers = {ln["logger"].split(".")[0] for ln in during}
    assert "nanogrid_celery" in loggers and loggers - {"nanogrid_celery"}, loggers


def _wait(cond, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"condition not met in {timeout}s")
