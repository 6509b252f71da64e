"""Issue #7: a burst of 1,000 runs across two worker processes - every one answered, once."""

from __future__ import annotations

import os

import pytest

from benchmarks.load import run_burst

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

RUNS = int(os.environ.get("NANOGRID_TEST_BURST", "1000"))


def test_burst_across_two_workers_one_result_each_no_duplicates_no_leaks():
    a = WorkerProcess("load-a", concurrency=2, pool_python=2, pool_cpp=0)
    b = WorkerProcess("load-b", concurrency=2, pool_python=2, pool_cpp=0, queue=a.queue)
    try:
        a.start()
        b.start()
        report = run_burst(RUNS, clients=4, queue=a.queue, instances=[a.instance, b.instance])
        print("\n" + report.summary())
        assert report.results == RUNS, report.summary()
        assert report.missing == 0 and report.wrong_id == 0, report.summary()
        assert report.duplicate_runs == 0 and report.not_started == 0, report.summary()
        assert report.statuses == {"success": RUNS}, report.summary()
        assert report.wrong_output == 0, report.summary()
        assert report.leased_containers == 0, report.summary()
        served_by = {w.name: w.log_path.read_text().count("run finished") for w in (a, b)}
        assert all(served_by.values()), f"both workers must take part: {served_by}"
    finally:
        a.stop()
        b.stop()
    assert a.containers() == [] and b.containers() == [], "no container may outlive its worker"
