"""Issue #7: Redis and moto (SQS + S3) go away and come back; the worker recovers.

Each test runs its OWN redis-server / moto_server on a free port (the shared
ones on 6379 and 5000 serve other engineers' tests and are never touched),
a worker pointed at it, and an :class:`IsolatedClient` that talks to it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from nanogrid_celery.config import get_settings
from nanogrid_celery.delivery.deadletter import ensure_dead_letter_queue
from nanogrid_celery.result import Status

from .faults import (
    IsolatedClient,
    MotoServer,
    RedisServer,
    claim_holder,
    leased_container,
    started,
    wait_for,
)
from .harness import WorkerProcess

pytestmark = pytest.mark.integration

SLOW = "import time; time.sleep({s}); print('survived')"


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def moto_server():
    server = MotoServer().start()
    yield server
    server.stop()


def test_redis_restart_mid_run_result_still_stored_and_worker_reconnects(redis_server):
    url = redis_server.url
    # a 3 s claim TTL: the claim keeper refreshes every second, so it meets the restart
    w = started(
        WorkerProcess(
            "redis-restart",
            pool_python=1,
            pool_cpp=0,
            result_backend=url,
            redis_url=url,
            claim_ttl_s=3,
        )
    )
    c = IsolatedClient(result_backend=url, redis_url=url)
    try:
        before = c.wait(c.submit({"main.py": "print('before')"}, w.queue))
        assert before.stdout == "before\n"

        rid = c.submit({"main.py": SLOW.format(s=4)}, w.queue)
        wait_for(lambda: claim_holder(rid, url), 60, "the run to start")
        redis_server.restart(down_for=1.0)  # no persistence: Redis comes back empty
        during = c.wait(rid, timeout=90)
        assert during.status == Status.SUCCESS, during
        assert during.stdout == "survived\n"

        after = c.wait(c.submit({"main.py": "print('after')"}, w.queue), timeout=60)
        assert after.status == Status.SUCCESS and after.stdout == "after\n"
        log = w.log_path.read_text().splitlines()
        assert sum(rid in ln for ln in log if "run finished" in ln) == 1, "ran twice"
        assert any(rid in ln for ln in log if "claim re-taken" in ln), "claim not restored"
    finally:
        c.close()
        w.stop()
    assert w.containers() == []


def test_moto_down_during_a_run_then_back(moto_server):
    """SQS and S3 vanish mid-run: the run's result still lands; the worker serves again after."""
    env = {"broker_url": moto_server.broker_url, "s3_endpoint_url": moto_server.endpoint}
    w = started(WorkerProcess("moto-down", pool_python=1, pool_cpp=0, sqs_wait_seconds=2, **env))
    c = IsolatedClient(**env, sqs_wait_seconds=2)
    try:
        rid = c.submit({"main.py": SLOW.format(s=4)}, w.queue)
        wait_for(lambda: leased_container(w), 60, "the code to be fetched and running")
        assert claim_holder(rid)
        moto_server.stop()
        during = c.wait(rid, timeout=60)  # results live in Redis, which stayed up
        assert during.status == Status.SUCCESS, during
        time.sleep(3)  # the worker polls a dead endpoint for a while
        moto_server.start()  # empty: it forgot the queue, which is then "not found" (a 4xx)
        wait_for(lambda: "SQS polling recovered" in w.log_path.read_text(), 60, "polling")
        assert w.proc.poll() is None, "the worker must survive the outage"
        assert "re-creating it" in w.log_path.read_text()
        # real SQS keeps its queues (and their redrive policy) through an outage
        ensure_dead_letter_queue(replace(get_settings(), queue=w.queue, **env))
        after = c.wait(c.submit({"main.py": "print('back')"}, w.queue), timeout=120)
        assert after.status == Status.SUCCESS, after
        assert after.stdout == "back\n"
    finally:
        c.close()
        w.stop()
    assert w.containers() == []


def test_s3_unavailable_is_bounded_internal_error_with_a_message(moto_server):
    """S3 down when the worker fetches the code: a few retries, then ``internal_error``."""
    w = started(
        WorkerProcess("s3-down", pool_python=1, pool_cpp=0, s3_endpoint_url=moto_server.endpoint)
    )
    c = IsolatedClient(s3_endpoint_url=moto_server.endpoint)
    try:
        rid = "req-s3down-" + str(int(time.time() * 1000))
        bucket, key = c.upload({"main.py": "print('unreachable')"}, rid)
        moto_server.stop()
        t0 = time.monotonic()
        c.enqueue(rid, bucket, key, w.queue)
        result = c.wait(rid, timeout=90)
        elapsed = time.monotonic() - t0
        assert result.status == Status.INTERNAL_ERROR, result
        assert "S3 unavailable" in result.message and key in result.message
        assert elapsed < 60, f"S3 retries must be bounded, took {elapsed:.1f}s"

        moto_server.start()
        ok = c.wait(c.submit({"main.py": "print('s3 back')"}, w.queue), timeout=60)
        assert ok.status == Status.SUCCESS and ok.stdout == "s3 back\n"
    finally:
        c.close()
        w.stop()
    assert w.containers() == []
