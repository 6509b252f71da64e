"""The asynchronous ack: the slot is free at once, every delete is sent, failures are retried.

A fake boto3 client stands in for SQS; the channel is a minimal stand-in for kombu's.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from nanogrid_celery.delivery.async_ack import AsyncAck, Deleter


class FakeSQS:
    def __init__(self, fail: list[Exception] | None = None, delay: float = 0.0) -> None:
        self.fail = list(fail or [])
        self.delay = delay
        self.deleted: list[str] = []
        self.calls = 0
        self.threads: set[str] = set()

    def delete_message(self, QueueUrl: str, ReceiptHandle: str) -> None:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail:
            raise self.fail.pop(0)
        self.deleted.append(ReceiptHandle)

    def change_message_visibility(
        self, QueueUrl: str, ReceiptHandle: str, VisibilityTimeout: int
    ) -> None:
        self.calls += 1
        if self.fail:
            raise self.fail.pop(0)
        self.deleted.append(f"{ReceiptHandle}:{VisibilityTimeout}")  # in order with the deletes


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "DeleteMessage")


class KombuChannel:
    """What AsyncAck's ``super()`` reaches: kombu's blocking ack (recorded)."""

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        self.blocking_acks.append(delivery_tag)

    def close(self) -> None:
        self.closed = True


class Channel(AsyncAck, KombuChannel):
    def __init__(self, sqs: FakeSQS, async_ack: bool = True) -> None:
        self.transport_options = {"async_ack": async_ack}
        self.blocking_acks: list[Any] = []
        self.acked: list[Any] = []
        self.closed = False
        self._sqs = sqs
        messages = {
            tag: SimpleNamespace(
                delivery_info={
                    "sqs_message": {"ReceiptHandle": f"rh-{tag}"},
                    "sqs_queue": "http://sqs/q",
                    "routing_key": "q",
                },
                headers={"id": f"req-{tag}"},
            )
            for tag in range(10)
        }
        self.qos = SimpleNamespace(get=messages.__getitem__, ack=self.acked.append)

    def canonical_queue_name(self, name: str) -> str:
        return name

    def sqs(self, queue: str | None = None) -> FakeSQS:
        return self._sqs


def test_the_slot_is_free_before_the_delete_is_sent_and_close_waits_for_it():
    sqs = FakeSQS(delay=0.2)
    channel = Channel(sqs)
    t0 = time.monotonic()
    channel.basic_ack(1)
    assert time.monotonic() - t0 < 0.1  # did not wait for the 0.2 s delete
    assert channel.acked == [1] and sqs.deleted == []
    channel.close()  # a warm shutdown: every queued delete goes out first
    assert sqs.deleted == ["rh-1"] and channel.closed
    assert sqs.threads == {"sqs-deleter"}


def test_deletes_go_out_in_order_and_flush_reports_when_done():
    sqs = FakeSQS()
    channel = Channel(sqs)
    for tag in range(5):
        channel.basic_ack(tag)
    assert channel._deleter().flush(5)
    assert sqs.deleted == [f"rh-{t}" for t in range(5)]
    channel.close()


def test_a_failed_delete_is_retried_then_given_up_without_stopping_the_thread(monkeypatch):
    monkeypatch.setattr(Deleter, "backoff_s", 0.01)
    sqs = FakeSQS(fail=[EndpointConnectionError(endpoint_url="http://sqs")] * 3)
    channel = Channel(sqs)
    channel.basic_ack(1)  # three failures: given up (SQS redelivers; idempotency holds)
    channel.basic_ack(2)
    channel.close()
    assert sqs.calls == 4 and sqs.deleted == ["rh-2"]


def test_a_transient_failure_is_retried_until_it_succeeds(monkeypatch):
    monkeypatch.setattr(Deleter, "backoff_s", 0.01)
    sqs = FakeSQS(fail=[client_error("ServiceUnavailable")])
    channel = Channel(sqs)
    channel.basic_ack(3)
    channel.close()
    assert sqs.deleted == ["rh-3"] and sqs.calls == 2


@pytest.mark.parametrize("code", ["ReceiptHandleIsInvalid", "InvalidParameterValue"])
def test_a_stale_receipt_handle_is_not_retried(code):
    sqs = FakeSQS(fail=[client_error(code)])
    channel = Channel(sqs)
    channel.basic_ack(4)
    channel.close()
    assert sqs.calls == 1


def test_async_ack_off_is_kombus_blocking_ack():
    sqs = FakeSQS()
    channel = Channel(sqs, async_ack=False)
    channel.basic_ack(5)
    assert channel.blocking_acks == [5] and channel.acked == [] and sqs.calls == 0
    channel.close()


def test_visibility_changes_go_out_in_order_with_the_deletes(monkeypatch):
    """The look-ahead's give-backs and extensions (delivery/look_ahead.py) share the thread."""
    monkeypatch.setattr(Deleter, "backoff_s", 0.01)
    sqs = FakeSQS(fail=[EndpointConnectionError(endpoint_url="http://sqs")])
    channel = Channel(sqs)
    deleter = channel._deleter()
    deleter.submit_visibility(sqs, "http://sqs/q", "rh-9", 0, "req-9")  # fails once: retried
    channel.basic_ack(1)
    deleter.submit_visibility(sqs, "http://sqs/q", "rh-8", 600)
    channel.close()
    assert sqs.deleted == ["rh-9:0", "rh-1", "rh-8:600"]
