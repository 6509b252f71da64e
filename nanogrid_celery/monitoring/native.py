"""One app for everything: tasks on SQS, remote control and events on the events Redis.

``celery -A nanogrid_celery inspect ping|status|events|flower`` used to answer
"No nodes replied": the client side of remote control (``app.control``) and of
events (``app.events``, Flower's ``app.connection()``) used the app's broker,
SQS, which has no fanout. :class:`NanoGrid` keeps producing and consuming
*tasks* on SQS (``connection_for_write``/``connection_for_read``, the producer
pool) and moves every fanout user to ``events_broker_url``:

* :class:`RedisControlClient` (``app.control``): every broadcast - inspect,
  ping, pool_grow/shrink, shutdown, revoke - runs on a *fresh* Redis
  connection (a few ms). kombu's Redis transport can hand a pooled connection
  to the next call while a BRPOP for the previous call's reply queue is still
  pending on it, and that call never reads its own replies (Flower: partial
  ``/api/workers``, pool grow answered 403); one connection per call avoids it.
  ``purge`` still goes to SQS: it is about task queues.
* :class:`RedisEvents` (``app.events``): a receiver handed a connection whose
  transport cannot route events (SQS: no topic exchange) - ``celery events``
  passes ``connection_for_read()`` - listens on the events Redis instead; the
  default dispatcher (``Task.send_event``) publishes there too.
* :meth:`NanoGrid.connection`: Celery itself produces and consumes with
  ``connection_for_write``/``connection_for_read`` and documents the generic
  ``connection()`` as superseded by them; its remaining callers are monitoring
  tools - Flower's event capture and broker page - and the worker's banner. It
  returns the events connection; the banner is corrected by :class:`Worker`.
* :class:`RunResult` (``app.AsyncResult``): ``run_status`` and
  ``execution_result`` on top of Celery's result, so the run's own outcome is
  one attribute away while ``get()`` keeps returning the ExecutionResult dict.

With ``events_broker_url = ""`` everything falls back to Celery's behaviour.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property
from typing import Any

from celery import Celery
from celery.app.control import Control
from celery.app.events import Events
from celery.apps.worker import Worker as CeleryWorker
from celery.events.receiver import EventReceiver
from celery.result import AsyncResult
from kombu import Connection

from nanogrid_celery.config import get_settings
from nanogrid_celery.monitoring.connection import monitoring_connection


def events_url() -> str:
    return get_settings().events_broker_url


def _routes_events(conn: Any) -> bool:
    """True when ``conn``'s transport has the topic exchange Celery's events need."""
    try:
        return "topic" in conn.transport.implements.exchange_type
    except AttributeError:  # not a kombu Connection (a channel): the caller knows best
        return True


class RedisControlClient(Control):
    """``app.control`` whose broadcasts use a fresh connection to the events Redis."""

    def __init__(self, app: Celery) -> None:
        super().__init__(app)
        if events_url():
            # Publish on the call's own channel, never through the SQS producer pool.
            self.mailbox._producer_pool = None

    def _after_fork(self) -> None:
        if not events_url():
            super()._after_fork()

    def broadcast(self, command: str, *args: Any, connection: Any = None, **kwargs: Any) -> Any:
        url = events_url()
        if connection is not None or not url:
            return super().broadcast(command, *args, connection=connection, **kwargs)
        conn = monitoring_connection(url)
        try:
            return super().broadcast(command, *args, connection=conn, **kwargs)
        finally:
            conn.release()


class EventsReceiver(EventReceiver):
    """Listens on the events Redis when handed a connection that cannot carry events."""

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        url = events_url()
        if url and isinstance(channel, Connection) and not _routes_events(channel):
            channel = monitoring_connection(url)
        super().__init__(channel, *args, **kwargs)


class RedisEvents(Events):
    """``app.events`` with the receiver above and a default dispatcher on the events Redis."""

    receiver_cls = f"{__name__}:EventsReceiver"

    @contextmanager
    def default_dispatcher(self, hostname=None, enabled=True, buffer_while_offline=False):
        url = events_url()
        if not url:
            with super().default_dispatcher(hostname, enabled, buffer_while_offline) as d:
                yield d
            return
        conn = monitoring_connection(url)
        try:
            with self.Dispatcher(conn, hostname, enabled, None, buffer_while_offline) as d:
                yield d
        finally:
            conn.release()


class RunResult(AsyncResult):
    """Celery's AsyncResult plus the run's own outcome (``get()`` is unchanged)."""

    @property
    def execution_result(self) -> Any:
        """The :class:`ExecutionResult` once the run finished, else None."""
        from nanogrid_celery.result import ExecutionResult

        if not self.successful():
            return None
        data = self.result
        if not isinstance(data, dict) or "status" not in data:
            return None
        return ExecutionResult.from_dict(data)

    @property
    def run_status(self) -> str | None:
        """``success``/``error``/``timeout``/``oom``/... once finished; None before."""
        data = self.result if self.successful() else None
        if isinstance(data, dict) and isinstance(data.get("status"), str):
            return data["status"]
        return None


class Worker(CeleryWorker):
    """The worker's banner names SQS as its transport and the events Redis separately."""

    def startup_info(self, artlines: bool = True) -> str:
        text = super().startup_info(artlines)
        url = events_url()
        if not url:
            return text
        events_uri = self.app.connection().as_uri()
        tasks_uri = self.app.connection_for_write().as_uri()
        return text.replace(events_uri, f"{tasks_uri} (events, control: {events_uri})", 1)


class NanoGrid(Celery):
    """The NanoGrid Celery app (see the module doc)."""

    control_cls = f"{__name__}:RedisControlClient"
    events_cls = f"{__name__}:RedisEvents"

    def connection(self, hostname: str | None = None, **kwargs: Any) -> Connection:
        """The events broker for monitoring tools (Flower); tasks never use this method."""
        url = events_url()
        if hostname or kwargs or not url:
            return super().connection(hostname, **kwargs)
        return monitoring_connection(url)

    broker_connection = connection

    @cached_property
    def AsyncResult(self) -> type[RunResult]:
        return self.subclass_with_self(RunResult)

    @cached_property
    def Worker(self) -> type[Worker]:
        return self.subclass_with_self(Worker)
