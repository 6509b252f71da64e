"""Celery events and remote control over Redis for a worker whose broker is SQS.

SQS has no fanout, so a stock worker sends no events and answers no remote
control, and Flower shows nothing. :class:`RedisEventsConsumer` (set as
``worker_consumer``) keeps tasks on SQS but moves the two fanout users to the
monitoring Redis (``events_broker_url``):

* **Events** - the Events bootstep gets its connection from
  :meth:`RedisEventsConsumer.connection_for_write`, which only that bootstep
  calls; task events and worker heartbeats then go to Redis, where
  ``celery flower --broker=<events_broker_url>`` reads them.
* **Remote control** - :class:`RedisControl` replaces the Control bootstep (which
  is skipped on SQS). A thread owns the Redis connection and listens on the
  pidbox fanout; each command is handed to the worker's event loop and runs
  there, exactly as in a stock worker, so pool_grow/shrink, revoke and
  shutdown stay single-threaded. A Redis outage only costs remote control (the
  thread reconnects with backoff); it never restarts the consumer or touches
  the SQS connection, so in-flight runs and their acks are unaffected.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from copy import copy
from functools import wraps
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from celery.utils.collections import AttributeDict
from celery.utils.functional import pass1
from celery.worker import control as control_panel
from celery.worker.consumer import Consumer
from celery.worker.consumer.control import Control
from celery.worker.pidbox import Pidbox
from kombu.pidbox import Mailbox
from kombu.utils.encoding import safe_str

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import get_settings
from nanogrid_celery.monitoring.connection import monitoring_connection

log = get_logger(__name__)

STOCK_CONTROL = "celery.worker.consumer.control:Control"
REDIS_CONTROL = f"{__name__}:RedisControl"
# How long a control command may wait for the event loop before it answers with an error.
COMMAND_TIMEOUT_S = 10.0
RECONNECT_MAX_S = 30.0
# Longest wait for a client's reply queue to be bound before replying anyway.
REPLY_BIND_WAIT_S = 0.5


def _events_url() -> str:
    return get_settings().events_broker_url


def _redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":**@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class RedisEventsMixin:
    """Consumer mixin: events and remote control on ``events_broker_url``.

    A mixin so it composes with other Consumer subclasses (the worker's class is
    :class:`nanogrid_celery.service.consumer.WorkerConsumer`); put it first in the bases.
    """

    class Blueprint(Consumer.Blueprint):
        default_steps = [
            REDIS_CONTROL if step == STOCK_CONTROL else step
            for step in Consumer.Blueprint.default_steps
        ]

    # -- task events: one publish per flush interval, not one per loop pass ----------
    _events_flush_timer: Any = None

    def on_send_event_buffered(self) -> None:
        """Flush the buffered task events once ``events_flush_ms`` after the first one.

        Celery flushes on the next loop pass, so a python hello run cost three PUBLISHes
        (received, started, succeeded) in the worker's main process: at -c 1 and 31
        runs/s on this 2-core host that was 30% of its CPU, which the run's own slot
        competes for (kombu builds a Redis client per fanout publish). Held for 100 ms,
        every event of ~3 runs goes out in one ``task.multi`` message; Flower and the
        run-state view see a task at most that much later. Celery's ``buffer_limit``
        (24 events) still flushes a full buffer at once.
        """
        delay = get_settings().events_flush_ms / 1000
        hub = getattr(self, "hub", None)
        if hub is None or delay <= 0:
            super().on_send_event_buffered()  # type: ignore[misc]
            return
        if self._events_flush_timer is None:
            self._events_flush_timer = hub.call_later(delay, self._flush_held_events)

    def _flush_held_events(self) -> None:
        self._events_flush_timer = None
        self._flush_events()  # type: ignore[attr-defined]

    def shutdown(self) -> None:
        """Send the held task events before the Events bootstep closes its dispatcher."""
        if self._events_flush_timer is not None:
            with contextlib.suppress(Exception):  # events are an observer: never block shutdown
                self._events_flush_timer.cancel()
            self._events_flush_timer = None
            with contextlib.suppress(Exception):
                self._flush_events()  # type: ignore[attr-defined]
        super().shutdown()  # type: ignore[misc]

    def connection_for_write(self, url: str | None = None, heartbeat: float | None = None):
        """The monitoring Redis for the Events bootstep (its only caller without ``url``)."""
        events_url = _events_url()
        if url or not events_url:
            return super().connection_for_write(url=url, heartbeat=heartbeat)
        conn = monitoring_connection(events_url)
        try:
            conn.ensure_connection(max_retries=0)
            log.info("sending Celery events to Redis", url=_redact(events_url))
        except Exception as exc:  # events are an observer: never block the worker on them
            log.warning(
                "events Redis unreachable; events are buffered until it is back",
                url=_redact(events_url),
                error=str(exc),
            )
        return conn


class RedisEventsConsumer(RedisEventsMixin, Consumer):
    """Celery's consumer with events and remote control over Redis."""


class ReplyWhenBoundMailbox(Mailbox):
    """Replies only once the client's reply queue is bound (waiting at most a moment).

    kombu's client publishes a command *before* it declares its reply queue, and on
    Redis a reply published in between has no binding to route to and is dropped
    (cf. celery/kombu#1063). A worker that answers in a few ms - this one - often
    wins that race, so Flower's inspect calls came back empty. Waiting here costs
    the pidbox thread, never the worker's event loop.
    """

    def _publish_reply(self, reply, exchange, routing_key, ticket, channel=None, **opts):
        if channel is not None:
            _wait_for_binding(channel, exchange, routing_key)
        return super()._publish_reply(reply, exchange, routing_key, ticket, channel=channel, **opts)


def _wait_for_binding(channel: Any, exchange: str, routing_key: str) -> bool:
    deadline = time.monotonic() + REPLY_BIND_WAIT_S
    while True:
        try:
            if any(binding[0] == routing_key for binding in channel.get_table(exchange)):
                return True
        except Exception:  # no table yet, or a transport without one: just publish
            log.debug("reply binding lookup failed", exc_info=True)
        if time.monotonic() >= deadline:
            return False  # the client has gone; the reply is dropped as before
        time.sleep(0.005)


class RedisPidbox(Pidbox):
    """Remote control on the Redis pidbox fanout; commands run on the worker's event loop."""

    def __init__(self, c: Consumer, url: str) -> None:
        self.c = c
        self.url = url
        self.hostname = c.hostname
        # The app's mailbox publishes replies through the app's producer pool, which is
        # SQS here; a copy without it replies on the node's own (Redis) channel.
        mailbox = copy(c.app.control.mailbox)
        mailbox.__class__ = ReplyWhenBoundMailbox
        mailbox._producer_pool = None
        self.node = mailbox.Node(
            safe_str(c.hostname),
            handlers={name: self._in_loop(fn) for name, fn in control_panel.Panel.data.items()},
            state=AttributeDict(
                app=c.app,
                hostname=c.hostname,
                consumer=c,
                tset=pass1 if c.controller.use_eventloop else set,
            ),
        )
        self._forward_clock = c.app.clock.forward
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- commands run where a stock worker runs them -------------------------------
    def _in_loop(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def call(state: AttributeDict, **kwargs: Any) -> Any:
            hub = self.c.hub
            if hub is None:  # solo/threads pools have no event loop: run here
                return fn(state, **kwargs)
            done: Future = Future()

            def on_loop() -> None:
                if not done.set_running_or_notify_cancel():
                    return
                try:
                    done.set_result(fn(state, **kwargs))
                except Exception as exc:
                    done.set_exception(exc)
                # BaseException (WorkerShutdown from the `shutdown` command) propagates
                # in the event loop and stops the worker, as it does in a stock worker.

            hub.call_soon(on_loop)
            return done.result(timeout=COMMAND_TIMEOUT_S)

        return call

    def on_message(self, body: Any, message: Any) -> None:
        self._forward_clock()
        try:
            self.node.handle_message(body, message)
        except KeyError as exc:
            log.error("no such control command: %s", exc)
        except Exception as exc:
            log.error("control command error: %r", exc, exc_info=True)

    # -- life cycle ------------------------------------------------------------------
    def start(self, c: Consumer) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._listen, name="pidbox-redis", daemon=True)
        self._thread.start()

    def stop(self, c: Consumer) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=3)
        self._thread = None

    def shutdown(self, c: Consumer) -> None:
        self.stop(c)

    def _listen(self) -> None:
        """Consume the pidbox until stopped, reconnecting with backoff after an outage."""
        backoff = 1.0
        while not self._stop.is_set():
            conn = monitoring_connection(self.url)
            try:
                conn.ensure_connection(max_retries=0)
                self.node.channel = conn.channel()
                consumer = self.node.listen(callback=self.on_message)
                consumer.on_decode_error = _on_decode_error
                log.info(
                    "remote control listening on Redis",
                    url=_redact(self.url),
                    node=self.hostname,
                )
                backoff = 1.0
                try:
                    while not self._stop.is_set():
                        with contextlib.suppress(TimeoutError):  # nothing in 1 s
                            conn.drain_events(timeout=1.0)
                finally:
                    _quietly(consumer.cancel)
            except Exception as exc:
                log.warning(
                    "remote control over Redis unavailable; retrying",
                    error=str(exc),
                    retry_in_s=backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
            finally:
                _quietly(conn.release)


class RedisControl(Control):
    """The Control bootstep on Redis; on when remote control is enabled and a URL is set."""

    def __init__(self, c: Consumer, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.box = RedisPidbox(c, _events_url())
        self.start = self.box.start
        self.stop = self.box.stop
        self.shutdown = self.box.shutdown

    def include_if(self, c: Consumer) -> bool:
        return bool(c.app.conf.worker_enable_remote_control and _events_url())


def _on_decode_error(message: Any, exc: Exception) -> None:
    log.error("undecodable control message dropped: %s", exc)
    _quietly(message.ack)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.debug("cleanup failed", exc_info=True)
