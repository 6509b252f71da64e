"""SQS visibility: a slow run must never be handed to a second worker.

SQS hides a received message for the queue's visibility timeout and then
delivers it again, whether or not the first receiver is still working on it.
Two defences, both in the worker's main process (the one that holds the
kombu message and its receipt handle; the pool child never sees it):

* at startup, :func:`check_visibility_timeout` refuses a timeout shorter than
  the longest single run the limits allow (run + compile + margin);
* while a message is held, :class:`VisibilityHeartbeat` keeps pushing its
  visibility out (``ChangeMessageVisibility``), so retries, a slow queue in
  the worker or a long compile never let it reappear.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings
from nanogrid_celery.delivery.sqs import sqs_client

log = get_logger(__name__)

# SQS answers these when the message is already deleted or its handle is stale
_GONE = {"ReceiptHandleIsInvalid", "InvalidParameterValue", "MessageNotInflight"}


class VisibilityTooShort(SystemExit):
    """Raised at worker startup; a SystemExit so the worker exits with the message."""


def longest_run_seconds(settings: Settings) -> float:
    """The longest one attempt may take: compile + run limits + a margin for fetch and reset."""
    lim = settings.limits
    return (lim.max_timeout_ms + lim.compile_timeout_ms) / 1000 + settings.visibility_margin_s


def check_visibility_timeout(settings: Settings) -> None:
    need = longest_run_seconds(settings)
    if settings.visibility_timeout < need:
        raise VisibilityTooShort(
            f"NANOGRID_VISIBILITY_TIMEOUT={settings.visibility_timeout}s is shorter than the "
            f"longest allowed run ({need:.0f}s = max_timeout_ms + compile_timeout_ms + "
            "visibility_margin_s): SQS would deliver a slow run twice"
        )


def heartbeat_interval(settings: Settings) -> float:
    """Extend well before expiry: a quarter of the timeout, so three beats may fail in a row."""
    return max(1.0, settings.visibility_timeout / 4)


class VisibilityHeartbeat:
    """A thread that extends the visibility of every message the worker holds and has not acked.

    Requests are tracked from ``task_received`` (which runs in the consumer's
    thread); the beat reads a snapshot under a lock and skips messages that
    were acked, rejected or requeued meanwhile.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.interval = heartbeat_interval(settings)
        self._held: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.extended = 0

    def track(self, request: Any) -> None:
        with self._lock:
            self._held.add(request)

    def held(self) -> list[Any]:
        with self._lock:
            live = [r for r in self._held if not _message(r).acknowledged]
            self._held = weakref.WeakSet(live)
            return live

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sqs-visibility", daemon=True)
            self._thread.start()
            log.info(
                "visibility heartbeat started",
                interval_s=self.interval,
            )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the heartbeat must outlive any single failure
                log.exception("visibility heartbeat failed")

    def beat(self) -> int:
        """Extend every held message once; returns how many were extended."""
        count = 0
        for request in self.held():
            message = _message(request)
            info = message.delivery_info or {}
            url, handle = info.get("sqs_queue"), message.delivery_tag
            if not url or not handle or message.acknowledged:
                continue
            if extend(self.settings, url, handle, self.settings.visibility_timeout):
                count += 1
                log.info(
                    "extended message visibility",
                    task_id=getattr(request, "id", None),
                    visibility_s=self.settings.visibility_timeout,
                )
        self.extended += count
        return count


def extend(settings: Settings, queue_url: str, receipt_handle: str, seconds: int) -> bool:
    """Hide the message for ``seconds`` from now; False if it is already gone (acked)."""
    try:
        sqs_client(settings).change_message_visibility(
            QueueUrl=queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=seconds
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _GONE or "NonExistent" in code:
            return False
        log.warning("could not extend message visibility: %s", exc)
        return False
    except BotoCoreError as exc:
        log.warning("could not extend message visibility: %s", exc)
        return False
    return True


def _message(request: Any) -> Any:
    return request.message


def is_sqs(settings: Settings) -> bool:
    return settings.broker_url.startswith("sqs://")
