"""Issue #7: a slow run is never handed to a second worker by SQS (moto)."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.delivery.sqs import sqs_client
from nanogrid_celery.delivery.visibility import extend
from nanogrid_celery.result import Status

from .faults import started, starts
from .harness import WorkerProcess

pytestmark = pytest.mark.integration


def test_visibility_timeout_shorter_than_the_longest_run_is_refused_at_startup():
    w = WorkerProcess("short-vis", pool_python=1, pool_cpp=0, visibility_timeout=30)
    with pytest.raises(RuntimeError, match="worker exited early"):
        w.start(timeout=60)
    assert "shorter than the longest allowed run" in w.log_path.read_text()
    assert w.containers() == []


def test_extending_visibility_keeps_a_received_message_hidden():
    """The call the heartbeat makes, against real SQS semantics: hidden past its timeout."""
    settings = get_settings()
    sqs = sqs_client(settings)
    url = sqs.create_queue(
        QueueName=f"nanogrid-vis-{uuid.uuid4().hex[:8]}", Attributes={"VisibilityTimeout": "2"}
    )["QueueUrl"]
    try:
        sqs.send_message(QueueUrl=url, MessageBody="slow run")
        (msg,) = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1)["Messages"]
        t0 = time.monotonic()
        assert extend(settings, url, msg["ReceiptHandle"], 6)
        time.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))  # past the queue's own 2 s
        assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages") is None
        time.sleep(max(0.0, 7.0 - (time.monotonic() - t0)))  # past the extension
        again = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2).get("Messages")
        assert again and again[0]["MessageId"] == msg["MessageId"]
        # a deleted (acked) message cannot be extended: the heartbeat just skips it
        sqs.delete_message(QueueUrl=url, ReceiptHandle=again[0]["ReceiptHandle"])
        assert not extend(replace(settings), url, again[0]["ReceiptHandle"], 6)
    finally:
        sqs.delete_queue(QueueUrl=url)


def test_worker_heartbeat_extends_the_message_of_a_running_task():
    """Visibility 8 s (the least these limits allow): the worker extends it every 2 s."""
    w = started(
        WorkerProcess(
            "heartbeat",
            concurrency=2,
            pool_python=2,
            pool_cpp=0,
            visibility_timeout=8,
            max_timeout_ms=6000,
            default_timeout_ms=6000,
            compile_timeout_ms=1000,
            visibility_margin_s=1,
        )
    )
    try:
        handle = w.submit({"main.py": "import time; time.sleep(5); print('slow')"})
        result = w.run({"main.py": "print('quick')"})  # the other child stays free meanwhile
        assert result.stdout == "quick\n"
        slow = client.wait(handle, timeout=60)
        assert slow.status == Status.SUCCESS and slow.stdout == "slow\n"
        beats = [
            line
            for line in w.log_path.read_text().splitlines()
            if "extended message visibility" in line and handle.id in line
        ]
        assert len(beats) >= 2, "a 5 s run under an 8 s timeout gets at least two beats"
        assert starts(handle.id) == 1
    finally:
        w.stop()
    assert w.containers() == []
