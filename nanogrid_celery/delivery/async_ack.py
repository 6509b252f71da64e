"""An ack frees its worker slot at once; SQS's DeleteMessage follows on a background thread.

Kombu acks an SQS message with a blocking boto3 ``DeleteMessage`` on the
worker's event loop, and only then is the prefetch slot free and the next
ReceiveMessage sent (``prompt_receive.py``). Traced on a ``-c 1`` worker
against moto, python hello, one client (2 cores, a qemu VM running): a slot's
cycle of 42.9 ms (p50) was receive 8.5, dispatch to the child 2.8, the task
16.6, result to the parent 2.7 and the DeleteMessage 11.6 ms, the next
receive going out 0.1 ms after it. Here the delivery is forgotten (the slot
is free) as soon as the task is done, and the delete is handed to one
:class:`Deleter` thread per channel, so the next receive and the delete run
at the same time.

Why this is safe:

* A delete that never happens (SQS unreachable, the worker SIGKILLed with
  deletes queued) means SQS delivers the message again after its visibility
  timeout; the idempotency claim (``idempotency.py``) finds the finished
  result and the run does not happen twice. A failed delete is retried
  :attr:`Deleter.attempts` times with a short backoff before that.
* A warm shutdown loses nothing: closing the channel waits (up to
  :attr:`Deleter.flush_timeout_s`) until every queued delete is sent, and so
  does interpreter exit.
* boto3 clients are thread-safe; the deleter uses the channel's own client.

``NANOGRID_SQS_ASYNC_ACK=false`` restores kombu's blocking delete.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from nanogrid_celery.common.logs import get_logger

log = get_logger(__name__)

#: a receipt handle SQS will never accept again: the message is gone or was received anew
_STALE = ("InvalidParameterValue", "ReceiptHandleIsInvalid")


@dataclass(frozen=True)
class _Delete:
    client: Any
    queue_url: str
    receipt_handle: str
    request_id: str | None
    #: None: DeleteMessage; else ChangeMessageVisibility to this many seconds (look_ahead.py)
    visibility_s: int | None = None

    @property
    def what(self) -> str:
        return "delete" if self.visibility_s is None else "visibility change"


class Deleter:
    """One daemon thread sending a channel's queued SQS calls in order; see the module doc.

    Mostly deletes; the look-ahead (``look_ahead.py``) sends its visibility changes here
    too, so neither ever blocks the worker's event loop.
    """

    attempts = 3
    backoff_s = 0.2
    flush_timeout_s = 10.0

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Delete | None] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sqs-deleter", daemon=True)
        self._thread.start()
        _live.add(self)

    def submit(
        self, client: Any, queue_url: str, receipt_handle: str, request_id: str | None
    ) -> None:
        self._enqueue(_Delete(client, queue_url, receipt_handle, request_id))

    def submit_visibility(
        self,
        client: Any,
        queue_url: str,
        receipt_handle: str,
        seconds: int,
        request_id: str | None = None,
    ) -> None:
        """ChangeMessageVisibility, in order with the deletes (0: give the message back)."""
        self._enqueue(_Delete(client, queue_url, receipt_handle, request_id, seconds))

    def _enqueue(self, item: _Delete) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(item)

    @property
    def pending(self) -> int:
        with self._idle:
            return self._pending

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued delete was sent (or given up); False on timeout."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout is None else timeout)
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("SQS deletes still queued at shutdown", pending=self._pending)
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        _live.discard(self)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._delete(item)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _delete(self, item: _Delete) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                if item.visibility_s is None:
                    item.client.delete_message(
                        QueueUrl=item.queue_url, ReceiptHandle=item.receipt_handle
                    )
                else:
                    item.client.change_message_visibility(
                        QueueUrl=item.queue_url,
                        ReceiptHandle=item.receipt_handle,
                        VisibilityTimeout=item.visibility_s,
                    )
                return
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in _STALE:  # received again meanwhile: that delivery acks itself
                    log.info("SQS %s skipped: %s", item.what, code, request_id=item.request_id)
                    return
                error: Exception = exc
            except (BotoCoreError, OSError) as exc:
                error = exc
            except Exception as exc:  # never let the thread die: later deletes still go out
                error = exc
            if attempt < self.attempts:
                time.sleep(self.backoff_s * attempt)
        if item.visibility_s is not None:
            log.warning(
                "SQS visibility change to %ss failed; the message keeps the visibility it "
                "was received with: %s",
                item.visibility_s,
                error,
                request_id=item.request_id,
            )
            return
        log.warning(
            "SQS delete failed; the message comes back after its visibility timeout and "
            "the idempotency claim keeps it from running twice: %s",
            error,
            request_id=item.request_id,
        )


_live: weakref.WeakSet[Deleter] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for deleter in list(_live):
        deleter.flush()


class AsyncAck:
    """Mixin for kombu's SQS ``Channel``: ``basic_ack`` frees the slot, the delete follows."""

    transport_options: dict[str, Any]
    qos: Any

    @property
    def async_ack(self) -> bool:
        return bool(self.transport_options.get("async_ack", True))

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        if not self.async_ack:
            super().basic_ack(delivery_tag, multiple)  # type: ignore[misc]
            return
        try:
            message = self.qos.get(delivery_tag)
            info = message.delivery_info
            receipt = info["sqs_message"]["ReceiptHandle"]
            queue_url = info["sqs_queue"]
        except KeyError:  # not an SQS delivery (kombu's own fallback)
            super().basic_ack(delivery_tag, multiple)  # type: ignore[misc]
            return
        name = self.canonical_queue_name(info["routing_key"]) if "routing_key" in info else None  # type: ignore[attr-defined]
        client = self.sqs(queue=name)  # type: ignore[attr-defined]
        request_id = (getattr(message, "headers", None) or {}).get("id")
        self._deleter().submit(client, queue_url, receipt, request_id)
        self._forget(delivery_tag)

    def _forget(self, delivery_tag: Any) -> None:
        """Kombu's virtual-channel ack: the delivery leaves the prefetch window."""
        self.qos.ack(delivery_tag)

    def _deleter(self) -> Deleter:
        deleter = self.__dict__.get("_sqs_deleter")
        if deleter is None:
            deleter = self.__dict__["_sqs_deleter"] = Deleter()
        return deleter

    def close(self) -> None:
        deleter = self.__dict__.pop("_sqs_deleter", None)
        if deleter is not None:
            deleter.close()  # a warm shutdown sends every queued delete first
        super().close()  # type: ignore[misc]
