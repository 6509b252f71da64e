"""The client's ``task-sent`` events, sent to the monitoring Redis instead of SQS.

With ``task_send_sent_event`` Celery publishes the event on the *task's*
producer - SQS here, where the topic ``celeryev`` exchange routes nowhere and
the event is silently dropped. So that setting stays off, and this
``after_task_publish`` receiver sends the same event (same fields as Celery's)
to ``events_broker_url``; Flower then shows a submission as soon as it is
queued, before any worker has received it.

A submission must never fail or wait because monitoring is down: a failed
send is logged and further sends are skipped for :data:`BACKOFF_S`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import current_app
from celery.events import EventDispatcher
from celery.signals import after_task_publish

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.common.perprocess import PerProcess
from nanogrid_celery.config import get_settings
from nanogrid_celery.monitoring.connection import monitoring_connection

log = get_logger(__name__)
BACKOFF_S = 30.0

_lock = threading.Lock()
_skip_until = 0.0


def _new_dispatcher(url: str) -> EventDispatcher:
    return current_app.events.Dispatcher(
        connection=monitoring_connection(url), enabled=True, buffer_while_offline=False
    )


_dispatchers: PerProcess[str, EventDispatcher] = PerProcess(_new_dispatcher)


def _get_dispatcher(url: str) -> EventDispatcher:
    """One dispatcher per process and URL (rebuilt after a fork); call with ``_lock`` held."""
    return _dispatchers.get(url)


def sent_event_fields(
    headers: dict[str, Any], exchange: str | None, routing_key: str | None
) -> dict[str, Any]:
    """The fields Celery's own ``task-sent`` event carries (task protocol 2 headers)."""
    return {
        "uuid": headers.get("id"),
        "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"),
        "name": headers.get("task"),
        "args": headers.get("argsrepr"),
        "kwargs": headers.get("kwargsrepr"),
        "retries": headers.get("retries", 0),
        "eta": headers.get("eta"),
        "expires": headers.get("expires"),
        "queue": routing_key,
        "exchange": exchange or "",
        "routing_key": routing_key,
    }


@after_task_publish.connect
def _send_task_sent(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    **_kw: Any,
) -> None:
    global _skip_until
    url = get_settings().events_broker_url
    if not url or not headers or "id" not in headers:
        return
    if time.monotonic() < _skip_until:
        return
    try:
        with _lock:
            _get_dispatcher(url).send(
                "task-sent", **sent_event_fields(headers, exchange, routing_key)
            )
    except Exception as exc:
        _skip_until = time.monotonic() + BACKOFF_S
        log.warning(
            "could not send the task-sent event; skipping them for a while",
            error=str(exc),
            skip_s=BACKOFF_S,
        )
