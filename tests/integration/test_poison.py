"""Issue #7: a poisoned message ends in the dead-letter queue instead of looping forever."""

from __future__ import annotations

import base64
import json
import os
import signal
from dataclasses import replace

import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.delivery.deadletter import dlq_name
from nanogrid_celery.delivery.sqs import queue_url, sqs_client
from nanogrid_celery.result import Status

from .faults import claim_holder, started, starts, wait_for
from .harness import WorkerProcess

pytestmark = pytest.mark.integration


def dlq_messages(queue: str, wait: float = 20) -> list[dict]:
    """Drain what the DLQ of ``queue`` holds (waiting up to ``wait`` s for the first one)."""
    settings = replace(get_settings(), queue=queue)
    sqs = sqs_client(settings)
    url = queue_url(sqs, dlq_name(settings))

    def receive() -> list[dict]:
        return sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        ).get("Messages", [])

    return wait_for(receive, wait, f"a message in {dlq_name(settings)}")


@pytest.fixture(scope="module")
def worker():
    w = started(WorkerProcess("poison", pool_python=1, pool_cpp=0))
    yield w
    w.stop()
    assert w.containers() == []


def _envelope(body: bytes, headers: dict) -> str:
    """A kombu SQS message (base64 JSON envelope) carrying ``body`` as JSON content."""
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "properties": {"body_encoding": "base64", "delivery_info": {}},
        "headers": headers,
    }
    return base64.b64encode(json.dumps(envelope).encode()).decode()


@pytest.mark.parametrize(
    "body",
    [
        "this is not json {{{",
        json.dumps({"hello": "not a celery message"}),
        _envelope(b"[[], {}, {}]", {"task": "no.such.task", "id": "x"}),
        _envelope(b"not json at all", {"task": "nanogrid.run_code", "id": "bad-body"}),
    ],
    ids=["garbage", "foreign-json", "unknown-task", "undecodable-body"],
)
def test_undecodable_or_unknown_message_is_dead_lettered_at_once(worker, body):
    sqs = sqs_client(get_settings())
    sqs.send_message(QueueUrl=queue_url(sqs, worker.queue), MessageBody=body)
    (parked,) = dlq_messages(worker.queue)
    assert parked["Body"] == body, "the DLQ keeps the bytes SQS delivered"
    assert parked["MessageAttributes"]["reason"]["StringValue"]
    # the queue itself is clean again and the worker still serves
    assert worker.run({"main.py": "print('still serving')"}).stdout == "still serving\n"


def test_request_that_kills_its_worker_every_time_is_dead_lettered():
    """Its child dies on every start (SIGKILL here); after ``max_starts`` the request is parked."""
    w = started(
        WorkerProcess("killer", pool_python=1, pool_cpp=0, max_starts=2, sqs_wait_seconds=1)
    )
    try:
        handle = w.submit({"main.py": "import time; time.sleep(30)"})
        seen: set[int] = set()
        for _ in range(2):
            holder = wait_for(
                lambda: (h := claim_holder(handle.id)) and int(h.split("|")[1]) not in seen and h,
                60,
                "a new child to start the run",
            )
            pid = int(holder.split("|")[1])
            seen.add(pid)
            os.kill(pid, signal.SIGKILL)
        result = client.wait(handle, timeout=60)
        assert result.status == Status.INTERNAL_ERROR, result
        assert "dead-lettered" in result.message
        assert starts(handle.id) == 3, "two lost starts, then parked instead of a third run"
        (parked,) = dlq_messages(w.queue)
        assert parked["MessageAttributes"]["request_id"]["StringValue"] == handle.id
        assert json.loads(parked["Body"])["kwargs"]["s3_key"].endswith("code.zip")
        assert w.run({"main.py": "print('next')"}).stdout == "next\n"
    finally:
        w.stop()
    assert w.containers() == []


def test_redrive_policy_backs_up_messages_that_are_never_acked(worker):
    """SQS itself parks a message received ``dlq_max_receives`` times (the last line of defence)."""
    settings = replace(get_settings(), queue=worker.queue)
    sqs = sqs_client(settings)
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url(sqs, worker.queue), AttributeNames=["RedrivePolicy", "VisibilityTimeout"]
    )["Attributes"]
    policy = json.loads(attrs["RedrivePolicy"])
    assert policy["deadLetterTargetArn"].endswith(":" + dlq_name(settings))
    assert int(policy["maxReceiveCount"]) == settings.dlq_max_receives
    assert int(attrs["VisibilityTimeout"]) == settings.visibility_timeout
