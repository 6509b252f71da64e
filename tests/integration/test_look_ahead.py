"""Issue 17: the look-ahead (nanogrid_celery/delivery/look_ahead.py) with real workers.

While a ``-c 1`` worker's slot is busy with a short run, the next message is
received and held for it. What must hold: every message still runs exactly
once, a long run is not looked ahead (nothing held hostage), and a held
message of a SIGKILLed worker is visible again after the look-ahead's short
visibility, not the queue's 600 s.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque

import boto3
import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.delivery.look_ahead import GIVEN_BACK
from nanogrid_celery.delivery.sqs import queue_url, sqs_client
from nanogrid_celery.result import Status

from .faults import IsolatedClient, MotoServer, child_pids, started, wait_for
from .harness import WorkerProcess

pytestmark = pytest.mark.integration

HELLO = {"main.py": "print('hello')"}


def look_aheads(moto: MotoServer, queue: str) -> int:
    """Look-ahead receives: the only ReceiveMessage calls that set a VisibilityTimeout."""
    return sum("VisibilityTimeout" in body for body in moto.sqs_requests("ReceiveMessage", queue))


def test_two_clients_on_one_slot_every_message_once_none_given_back() -> None:
    moto = MotoServer(record=True).start()
    env = {"broker_url": moto.broker_url, "s3_endpoint_url": moto.endpoint}
    w = WorkerProcess("la-once", concurrency=1, pool_python=1, pool_cpp=0, **env)
    c = IsolatedClient(broker_url=moto.broker_url, s3_endpoint_url=moto.endpoint)
    runs = 40
    try:
        started(w)
        for _ in range(5):  # busy periods for the look-ahead to go by
            assert c.wait(c.submit(HELLO, w.queue), timeout=60).status == Status.SUCCESS
        pending = deque(c.submit(HELLO, w.queue) for _ in range(2))
        results = []
        for i in range(runs):
            results.append(c.wait(pending.popleft(), timeout=60))
            if i < runs - 2:
                pending.append(c.submit(HELLO, w.queue))
        results += [c.wait(h, timeout=60) for h in pending]
        assert w.stop() == 0
        deletes = moto.sqs_calls("DeleteMessage", w.queue)
        changes = moto.sqs_calls("ChangeMessageVisibility", w.queue)
        ahead = look_aheads(moto, w.queue)
    finally:
        c.close()
        w.stop()
        moto.stop()
    assert all(r.status == Status.SUCCESS for r in results), results
    assert len({r.request_id for r in results}) == runs
    assert deletes == runs + 5, "every message acked once"
    log = w.log_path.read_text()
    assert GIVEN_BACK not in log, "short runs: every held message went to the slot"
    print(f"{runs} runs from 2 clients: {ahead} look-ahead receives")
    assert ahead >= runs // 2, "the look-ahead did not take part"
    assert changes == 0, "short runs: no give-back, no visibility extension"


def test_long_runs_are_not_looked_ahead() -> None:
    """Runs longer than the hold: the worker consumes as with prefetch 1 (no message held
    hostage while another worker could take it)."""
    moto = MotoServer(record=True).start()
    env = {"broker_url": moto.broker_url, "s3_endpoint_url": moto.endpoint}
    w = WorkerProcess(
        "la-long", concurrency=1, pool_python=1, pool_cpp=0, sqs_look_ahead_hold_ms=200, **env
    )
    c = IsolatedClient(broker_url=moto.broker_url, s3_endpoint_url=moto.endpoint)
    slow = {"main.py": "import time; time.sleep(0.6); print('slow')"}
    try:
        started(w)
        handles = [c.submit(slow, w.queue) for _ in range(8)]
        assert all(c.wait(h, timeout=120).status == Status.SUCCESS for h in handles)
        ahead = look_aheads(moto, w.queue)
    finally:
        c.close()
        w.stop()
        moto.stop()
    assert ahead == 0, f"{ahead} look-aheads of runs longer than the hold"


def test_a_sigkilled_workers_held_message_is_back_after_the_short_visibility() -> None:
    """The whole worker dies (main process and child) while it holds a look-ahead message.

    The held message is hidden only for the look-ahead's visibility (here 8 s),
    not the queue's 600 s, and a replacement worker runs it once.
    """
    wait_s = 20
    knobs = {
        "pool_python": 1,
        "pool_cpp": 0,
        "sqs_look_ahead_hold_ms": 5000,  # longer than the test takes to kill it
        "sqs_look_ahead_visibility_s": 8,
        "sqs_wait_seconds": wait_s,
    }
    w = started(WorkerProcess("la-kill", concurrency=1, **knobs))
    replacement = None
    sqs = sqs_client(get_settings())
    try:
        for _ in range(5):  # busy periods for the look-ahead to go by
            assert w.run(HELLO).status == Status.SUCCESS
        # still running when the worker is killed (a replacement may run it again first)
        w.submit({"main.py": "import time; time.sleep(5); print('long')"})
        held = w.submit({"main.py": "print('held')"})
        url = queue_url(sqs, w.queue)

        def both_in_flight() -> bool:
            attrs = sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )["Attributes"]
            return attrs == {
                "ApproximateNumberOfMessages": "0",
                "ApproximateNumberOfMessagesNotVisible": "2",
            }

        wait_for(both_in_flight, 20, "the run and the held message both received", 0.05)
        for pid in [w.proc.pid, *child_pids(w.proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        w.proc.wait(30)
        replacement = started(
            WorkerProcess("la-kill2", concurrency=1, queue=w.queue, instance=w.instance, **knobs)
        )
        result = client.wait(held, timeout=120)
        back_s = time.monotonic() - killed
        print(f"held message of a SIGKILLed worker ran {back_s:.1f} s after the kill")
        assert result.status == Status.SUCCESS and result.stdout == "held\n", result
        assert back_s < 60, "the held message waited for the queue's visibility timeout"

    finally:
        for worker in (w, replacement):
            if worker is not None:
                worker.stop()
    assert (replacement or w).containers() == [], "the dead worker's containers are reaped"


def test_a_long_run_from_a_look_ahead_is_never_delivered_twice() -> None:
    """A look-ahead message hidden for 6 s that then runs for 9 s: its visibility is pushed
    out to the queue's while it runs, so SQS does not hand it to anyone else."""
    moto = MotoServer(record=True).start()
    env = {"broker_url": moto.broker_url, "s3_endpoint_url": moto.endpoint}
    w = WorkerProcess(
        "la-ext",
        concurrency=1,
        pool_python=1,
        pool_cpp=0,
        sqs_look_ahead_hold_ms=1000,
        sqs_look_ahead_visibility_s=6,
        **env,
    )
    c = IsolatedClient(broker_url=moto.broker_url, s3_endpoint_url=moto.endpoint)
    try:
        started(w)
        for _ in range(5):  # busy periods for the look-ahead to go by
            assert c.wait(c.submit(HELLO, w.queue), timeout=60).status == Status.SUCCESS
        short = c.submit({"main.py": "import time; time.sleep(0.5); print('short')"}, w.queue)
        long_run = c.submit({"main.py": "import time; time.sleep(9); print('long')"}, w.queue)
        assert c.wait(short, timeout=60).status == Status.SUCCESS
        received = time.monotonic()  # a little after the look-ahead received the long run
        sqs = boto3.client(
            "sqs",
            endpoint_url=moto.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        url = sqs.get_queue_url(QueueName=w.queue)["QueueUrl"]
        time.sleep(max(0.0, received + 7.0 - time.monotonic()))  # past the 6 s, still running
        attrs = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        result = c.wait(long_run, timeout=120)
        ahead = look_aheads(moto, w.queue)
    finally:
        c.close()
        w.stop()
        moto.stop()
    assert result.status == Status.SUCCESS and result.stdout == "long\n", result
    assert ahead >= 1, "the long run was not taken by a look-ahead"
    assert attrs == {
        "ApproximateNumberOfMessages": "0",
        "ApproximateNumberOfMessagesNotVisible": "1",
    }, f"7 s into the run its look-ahead visibility of 6 s was not pushed out: {attrs}"
    log = w.log_path.read_text()
    assert log.count(f"run_code[{long_run}] received") == 1, "delivered twice"
