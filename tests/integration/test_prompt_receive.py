"""Issue 17: a freed worker slot takes the next message at once; an idle worker still long-polls.

Real workers (``celery worker``) over moto SQS, Redis and Docker. Before the
fix a ``-c 1`` worker with two clients waited ~1 s for every message
(queue_ms p50 ~0.9 s, p95 ~1.9 s): kombu only asked SQS again on a later
pass of its event loop (nanogrid_celery/delivery/prompt_receive.py).
"""

from __future__ import annotations

import math
import time
from collections import deque
from itertools import pairwise

import pytest

from nanogrid_celery import client
from nanogrid_celery.result import Status

from .faults import IsolatedClient, MotoServer, started
from .harness import WorkerProcess

pytestmark = pytest.mark.integration

HELLO = {"main.py": "print('hello')"}


def percentile(values: list[float], pct: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, math.ceil(len(data) * pct / 100) - 1)]


def idle_gaps_ms(results: list) -> list[float]:
    """Slot idle while a message waited: from one run's end to the next run's start.

    Only pairs where the next message was already in SQS when the run before
    it finished, so a client's own think time is never counted; the runs'
    own cost is left out too, so load on the machine barely moves it.
    """
    runs = sorted(results, key=lambda r: r.started_at)
    gaps = []
    for a, b in pairwise(runs):
        submitted_b = b.started_at - b.queue_ms / 1000
        if submitted_b < a.finished_at:
            gaps.append((b.started_at - a.finished_at) * 1000)
    return gaps


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_one_slot_two_clients_no_idle_gaps(pool: str) -> None:
    """Two clients back to back on one slot: a message waits for one run, never for ~1 s."""
    w = started(WorkerProcess(f"gaps-{pool}", concurrency=1, pool=pool, pool_python=1, pool_cpp=0))
    try:
        assert w.run(HELLO).status == Status.SUCCESS  # warm-up
        # two clients, each submitting again as soon as its run is back: one message is
        # always waiting in SQS while the other runs
        pending = deque(w.submit(HELLO) for _ in range(2))
        results = []
        for _ in range(30):
            result = client.wait(pending.popleft(), timeout=60)
            assert result.status == Status.SUCCESS, result
            results.append(result)
            pending.append(w.submit(HELLO))
        for handle in pending:
            client.wait(handle, timeout=60)
    finally:
        w.stop()
    queue_ms = [r.queue_ms for r in results]
    gaps = idle_gaps_ms(results)
    q50, q95, g95 = percentile(queue_ms, 50), percentile(queue_ms, 95), percentile(gaps, 95)
    print(
        f"{pool} -c 1, 2 clients: queue_ms p50={q50:.0f} p95={q95:.0f}; slot idle while a "
        f"message waited p50={percentile(gaps, 50):.0f} p95={g95:.0f} ms ({len(gaps)} pairs)"
    )
    # before the fix: queue_ms p50 ~900 and p95 ~1900 ms, the slot idle ~900 ms per message
    assert len(gaps) >= 10, "the two clients did not keep a message waiting"
    assert g95 < 400, f"the slot sat idle {g95:.0f} ms (p95) while a message waited"
    assert q95 < 800, f"queue_ms p50={q50:.0f} p95={q95:.0f}: messages wait for a poll tick"


def test_idle_worker_makes_no_more_receives_than_kombus_loop() -> None:
    """After some work, an idle queue is long-polled: one ReceiveMessage per wait, as before.

    Two workers on one private moto that records every request: this one and
    one with the fix turned off (kombu's own loop, ``sqs_prompt_receive=false``).
    """
    wait_s, window_s = 2, 12
    moto = MotoServer(record=True).start()
    env = {"broker_url": moto.broker_url, "s3_endpoint_url": moto.endpoint}
    workers = {
        prompt: WorkerProcess(
            f"idle-{prompt}",
            pool_python=1,
            pool_cpp=0,
            sqs_wait_seconds=wait_s,
            sqs_prompt_receive=prompt,
            **env,
        )
        for prompt in ("true", "false")
    }
    c = IsolatedClient(broker_url=moto.broker_url, s3_endpoint_url=moto.endpoint)
    try:
        for w in workers.values():
            started(w)
        for w in workers.values():  # a few runs: acks that free the slot, then nothing
            for _ in range(3):
                assert c.wait(c.submit(HELLO, w.queue), timeout=60).status == Status.SUCCESS
        before = {k: moto.sqs_calls("ReceiveMessage", w.queue) for k, w in workers.items()}
        time.sleep(window_s)
        counts = {
            k: moto.sqs_calls("ReceiveMessage", w.queue) - before[k] for k, w in workers.items()
        }
    finally:
        c.close()
        for w in workers.values():
            w.stop()
        moto.stop()
    print(f"ReceiveMessage calls in {window_s} s idle (wait {wait_s} s): {counts}")
    assert counts["true"] <= window_s / wait_s + 1, counts  # long polls, no busy loop
    assert counts["true"] <= counts["false"] + 1, counts  # and no more than kombu's loop
    assert counts["true"] >= 1, "an idle worker must keep polling"


def test_every_delete_reaches_sqs_before_a_warm_shutdown_ends() -> None:
    """The ack frees the slot before DeleteMessage is sent (delivery/async_ack.py); a SIGTERM
    right after the last result must still send every delete (counted by a recording moto),
    or each message would come back after its visibility timeout."""
    moto = MotoServer(record=True).start()
    w = WorkerProcess(
        "acks", pool_python=1, pool_cpp=0, broker_url=moto.broker_url, s3_endpoint_url=moto.endpoint
    )
    c = IsolatedClient(broker_url=moto.broker_url, s3_endpoint_url=moto.endpoint)
    runs = 12
    try:
        started(w)
        ids = [c.submit(HELLO, w.queue) for _ in range(runs)]
        assert all(c.wait(i, timeout=120).status == Status.SUCCESS for i in ids)
        assert w.stop() == 0  # at once: deletes may still be queued in the worker
        deletes = moto.sqs_calls("DeleteMessage", w.queue)
    finally:
        c.close()
        w.stop()
        moto.stop()
    assert deletes == runs, f"{deletes} DeleteMessage calls for {runs} runs"
