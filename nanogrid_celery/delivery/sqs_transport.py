"""Kombu's SQS transport: a poll loop that survives an SQS outage and wastes no slot time.

Kombu polls each queue with a chain of callbacks: receive -> parse ->
schedule the next receive. When SQS cannot be reached, its async client
turns the failed call into ``[]`` and the parse step then raises: the chain
ends, the next receive is never scheduled and the worker silently stops
consuming for good. A 4xx answer (e.g. the queue does not exist) is worse:
it is re-raised out of the event loop and the worker exits. Both seen with
kombu 5.7 against a stopped and restarted moto (cf. celery/kombu#1127).
Here a failed poll is logged and retried with a capped backoff instead, so
the worker picks up work again as soon as SQS is back.

A slot freed by an ack or a requeue takes the next message at once instead
of ~1 s later: see :mod:`nanogrid_celery.delivery.prompt_receive` (issue 17);
the ack frees the slot before SQS's DeleteMessage is sent, which follows on
a background thread (:mod:`nanogrid_celery.delivery.async_ack`); and while
every slot is busy with short runs, the next message is received during the
run and held for the slot (:mod:`nanogrid_celery.delivery.look_ahead`).

A requeued message - its pool child was SIGKILLed mid-run
(``task_reject_on_worker_lost``), or the task raised ``Reject(requeue=True)``
- is made visible again after ``requeue_delay_seconds`` (0 by default,
``NANOGRID_SQS_REQUEUE_DELAY_S``); kombu hides it for ``wait_time_seconds``,
20 s here. Measured with a ``-c 1`` worker, a child killed 0.8 s into a 3 s
run: redelivered 24.1 s after the kill before, 0.14-0.26 s after (the new
child starts it 0.6-1.0 s after the kill). Running it again is safe: the
idempotency claim (:mod:`nanogrid_celery.delivery.idempotency`) of the dead
child is taken over and the run still happens exactly once; a message that
keeps killing its child is dead-lettered after ``max_starts`` starts.

Selected by ``broker_transport`` in ``celeryconfig``.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from kombu.transport import SQS
from vine import promise, transform

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.delivery.async_ack import AsyncAck
from nanogrid_celery.delivery.look_ahead import LookAhead
from nanogrid_celery.delivery.prompt_receive import PromptReceive

log = get_logger(__name__)

_QUEUE_GONE = ("NonExistentQueue", "QueueDoesNotExist")


class Channel(LookAhead, PromptReceive, AsyncAck, SQS.Channel):
    #: longest pause between two polls of an unreachable queue, seconds
    max_poll_backoff = 5.0

    def _schedule_queue(self, queue: str) -> None:
        if queue not in self._active_queues:
            return
        try:
            if self.qos.can_consume():
                self._get_bulk_async(
                    queue,
                    callback=promise(self._loop1, (queue,), on_error=self._poll_failed),
                )
            else:
                self._no_free_slot(queue)
        except Exception as exc:  # e.g. re-creating a vanished queue while SQS is down
            self._poll_failed(queue, exc)

    def _get_async(self, queue: str, count: int = 1, callback: Any = None) -> Any:
        """Kombu's, except that a failed receive reaches ``callback``'s error handler.

        Kombu chains the parse step as a plain promise, which re-raises a
        failed receive (any 4xx) out of the event loop: the worker stops with
        "Unrecoverable error".
        """
        q_url = self._new_queue(queue)
        qname = self.canonical_queue_name(queue)
        on_messages = transform(self._on_messages_ready, callback, q_url, queue)
        if callback is not None:
            on_messages = promise(on_messages, on_error=callback.throw)
        return self._get_from_sqs(
            queue_name=qname,
            queue_url=q_url,
            count=count,
            connection=self.asynsqs(queue=qname),
            callback=on_messages,
        )

    def _loop1(self, queue: str, messages_fetched: Any = None) -> None:
        failures = self._failures()
        if messages_fetched is not None and failures.pop(queue, 0):  # a receive came back
            log.info("SQS polling recovered", queue=queue)
        super()._loop1(queue, messages_fetched)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """Kombu's, except that a requeued message is visible again after the requeue delay."""
        if not message.get("redelivered"):
            super()._put(queue, message, **kwargs)
            return
        delay = int(self.transport_options.get("requeue_delay_seconds", self.wait_time_seconds))
        try:
            self.sqs(queue=self.canonical_queue_name(queue)).change_message_visibility(
                QueueUrl=self._new_queue(queue),
                ReceiptHandle=message["properties"]["delivery_tag"],
                VisibilityTimeout=delay,
            )
        except (ClientError, BotoCoreError) as exc:
            # SQS returns it anyway once its visibility timeout runs out: late, not lost
            log.warning(
                "could not requeue a message at once: %s",
                exc,
                queue=queue,
                request_id=(message.get("headers") or {}).get("id"),
            )

    def _poll_failed(self, queue: str, exc: BaseException) -> None:
        if any(code in str(exc) for code in _QUEUE_GONE):
            # forget its URL: the next poll re-creates the queue, as kombu does at startup
            self._queue_cache.pop(self.canonical_queue_name(queue), None)
            log.warning("SQS queue does not exist; re-creating it", queue=queue)
        failures = self._failures()
        n = failures[queue] = failures.get(queue, 0) + 1
        delay = min(self.max_poll_backoff, 0.25 * 2 ** (n - 1))
        if n == 1 or n % 20 == 0:
            log.warning(
                "SQS poll failed; retrying: %s",
                exc,
                queue=queue,
                failures=n,
                retry_in_s=delay,
            )
        self.hub.call_later(delay, self._schedule_queue, queue)

    def _failures(self) -> dict[str, int]:
        failures = self.__dict__.get("_poll_failures")
        if failures is None:
            failures = self.__dict__["_poll_failures"] = {}
        return failures


class Transport(SQS.Transport):
    Channel = Channel
