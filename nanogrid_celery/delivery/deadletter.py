"""The dead-letter queue: where a message goes instead of looping forever.

Three ways in, one queue (``<queue>-dlq`` unless NANOGRID_DEAD_LETTER_QUEUE
names another):

* **SQS redrive policy** (set on the work queue at worker start): a message
  received ``dlq_max_receives`` times without being acked - its worker child
  dies on it again and again, or nobody can decode it - is moved by SQS itself.
* **Undecodable or unknown messages**: :class:`DeadLetterConsumer` copies the
  raw SQS body to the DLQ at once and acks it (Celery would drop or reject it).
* **A request that keeps killing its worker**: the idempotency gate counts
  starts per request id and dead-letters it with an ``internal_error`` result,
  so the client gets an answer (see :mod:`nanogrid_celery.delivery.idempotency`).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from celery.worker.consumer import Consumer

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings, get_settings
from nanogrid_celery.delivery.sqs import queue_url, sqs_client

log = get_logger(__name__)

RETENTION_S = 14 * 86_400  # the SQS maximum: a DLQ is read by people, later


def dlq_name(settings: Settings) -> str:
    """``<queue>-dlq`` (a FIFO queue's DLQ must be FIFO too: ``<name>-dlq.fifo``)."""
    if settings.dead_letter_queue:
        return settings.dead_letter_queue
    if settings.queue.endswith(".fifo"):
        return f"{settings.queue[:-5]}-dlq.fifo"
    return f"{settings.queue}-dlq"


def ensure_dead_letter_queue(settings: Settings) -> tuple[str, str]:
    """Create the DLQ and give the work queue its visibility timeout and redrive policy.

    Idempotent; returns (work queue URL, DLQ URL). The work queue is created
    here if kombu has not done so yet, with the same attributes kombu would use.
    """
    client = sqs_client(settings)
    attributes = {"MessageRetentionPeriod": str(RETENTION_S)}
    if dlq_name(settings).endswith(".fifo"):
        attributes["FifoQueue"] = "true"
    dlq = client.create_queue(QueueName=dlq_name(settings), Attributes=attributes)["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    try:
        work = queue_url(client, settings.queue)
    except ClientError:
        work = client.create_queue(
            QueueName=settings.queue,
            Attributes={"VisibilityTimeout": str(settings.visibility_timeout)},
        )["QueueUrl"]
    policy = {"deadLetterTargetArn": arn, "maxReceiveCount": str(settings.dlq_max_receives)}
    client.set_queue_attributes(
        QueueUrl=work,
        Attributes={
            "VisibilityTimeout": str(settings.visibility_timeout),
            "RedrivePolicy": json.dumps(policy),
        },
    )
    log.info(
        "dead-letter queue ready",
        queue=settings.queue,
        dlq=dlq_name(settings),
        max_receives=settings.dlq_max_receives,
    )
    return work, dlq


def send_to_dlq(settings: Settings, body: str, reason: str, request_id: str | None = None) -> bool:
    """Put ``body`` on the DLQ with the reason as a message attribute; False if SQS refused."""
    attributes = {"reason": {"DataType": "String", "StringValue": reason[:1000] or "-"}}
    if request_id:
        attributes["request_id"] = {"DataType": "String", "StringValue": request_id}
    try:
        client = sqs_client(settings)
        fifo: dict[str, str] = {}
        if dlq_name(settings).endswith(".fifo"):
            fifo = {"MessageGroupId": "dead-letters", "MessageDeduplicationId": uuid.uuid4().hex}
        client.send_message(
            QueueUrl=queue_url(client, dlq_name(settings)),
            MessageBody=body or "(empty)",
            MessageAttributes=attributes,
            **fifo,
        )
    except (ClientError, BotoCoreError) as exc:
        log.error("could not dead-letter a message: %s", exc, reason=reason)
        return False
    log.warning(
        "message dead-lettered",
        dlq=dlq_name(settings),
        reason=reason,
        task_id=request_id,
    )
    return True


def _raw_body(message: Any) -> str:
    """The bytes SQS delivered (not kombu's decoding of them), so the DLQ copy is replayable."""
    sqs_message = (message.delivery_info or {}).get("sqs_message") or {}
    body = sqs_message.get("Body")
    if body is None:
        body = message.body
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)


class DeadLetterConsumer(Consumer):
    """Celery's consumer, but a message it cannot run goes to the DLQ instead of away.

    Celery acks an undecodable message (dropping it) and rejects an unknown
    one (which SQS would redeliver until the redrive policy fires, one
    visibility timeout at a time); here both are copied to the DLQ and acked
    at once. If the copy fails the message is left to the redrive policy.
    """

    def _dead_letter(self, message: Any, reason: str) -> None:
        headers = message.headers or {}
        copied = send_to_dlq(get_settings(), _raw_body(message), reason, headers.get("id"))
        try:
            if copied:
                message.ack()
            else:
                message.reject(requeue=False)
        except Exception as exc:  # already acked, or the connection is gone
            log.warning("could not settle a dead-lettered message: %s", exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        log.error("undecodable message: %s", exc)
        self._dead_letter(message, f"undecodable: {type(exc).__name__}: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        log.error("message in an unknown format")
        self._dead_letter(message, "unknown message format (not a Celery task message)")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task")
        log.error("message for an unknown task %r", name)
        self._dead_letter(message, f"unknown task {name!r}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        log.error("invalid task message: %s", exc)
        self._dead_letter(message, f"invalid task message: {exc}")


def setup_dead_letter_queue(settings: Settings, attempts: int = 5) -> bool:
    """Main process, at start: without a redrive policy a poison message loops forever."""
    if not settings.broker_url.startswith("sqs://"):
        return False
    for attempt in range(attempts):
        try:
            ensure_dead_letter_queue(settings)
            return True
        except (ClientError, BotoCoreError) as exc:
            log.warning("dead-letter queue setup failed (attempt %d): %s", attempt + 1, exc)
            time.sleep(1 + attempt)
    log.error("no dead-letter queue: poison messages will be redelivered until they expire")
    return False
