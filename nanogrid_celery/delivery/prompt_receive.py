"""A freed worker slot asks SQS for the next message at once, not on the hub's next 1 s tick.

Kombu polls each SQS queue with one chain of callbacks on the worker's event
loop (the hub): receive -> deliver -> schedule the next receive. With no free
prefetch slot (``-c 1``, prefetch 1, a task running) its ``_schedule_queue``
re-checks on every pass of the loop by re-adding itself with
``hub.call_soon``. The hub runs its ready callbacks (a set, in no fixed
order) at the top of a pass, fires due timers, then polls its file
descriptors with a timeout of up to 1 s; a ``call_soon`` made on the hub's
own thread does not end that poll. Celery acks a finished task with a
``call_soon`` too, so ack and re-check run in the same batch, and when the
re-check goes first it finds no slot, re-adds itself and the hub sleeps
~1 s before the next ReceiveMessage. Measured (kombu 5.7, celery 5.7, moto,
python hello, ``-c 1``): the next receive came 0.84-0.98 s after the ack;
2-4 runs/s at 1-4 clients, queue_ms p50 ~0.9 s at 2 clients, though a run
costs ~15 ms. After (benchmarks/RESULTS.md, consumer matrix, same run):
``-c 1`` 31.9 / 35.3 / 26.5 runs/s at 1 / 2 / 4 clients (before 1.8 / 2.1 /
2.7), queue_ms p50 43 ms at 2 clients (before 925), and the slot sits idle
23-39 ms (p50, tests) while a message waits instead of ~0.8 s; the rest is
ReceiveMessage, DeleteMessage and the run itself, one after the other. With
the delete moved off the loop (``async_ack.py``), on a quiet machine: 52.5 /
56.4 / 55.1 runs/s, queue_ms p50 24.9 ms at 2 clients (one run ahead in line);
the receive that still follows each run is taken off that path by the
look-ahead (``look_ahead.py``).

Here a poll with no free slot is *parked* instead of re-checking, and what
frees a slot - an ack, a reject or requeue, a larger prefetch count -
resumes it before the hub next sleeps, with a timer due now (fired before
the poll, whatever phase of the pass adds it). Two more hub quirks needed
handling, both measured with tracing:

* ``-P threads`` acks from a pool thread. With no pool pipes and no receive
  in flight the hub has no file descriptor to watch and then does not poll
  at all (so kombu's own waker is unwatched) but sleeps 0.1 s per pass: the
  ack waited 60-180 ms (9 runs/s at one client). The channel keeps a
  wake-up pipe (:class:`_Wakeup`) on the hub; a pool thread's ack writes
  to it after its ``call_soon``.
* solo acks inside the receive callback, which may run in the timer phase;
  the ``call_soon``'d ack then waits behind the poll, and the parked poll
  behind it (p95 queue_ms 0.8 s at 2 clients). Parking writes one byte to
  the same pipe: one more pass before the hub sleeps, no loop.

A parked poll also re-checks on its own after
:attr:`PromptReceive.park_recheck_s`, so a slot freed some other way is
noticed no later than kombu's loop would. Long polling is unchanged: one
chain per queue, and an empty receive is followed by one new long poll
(``wait_time_seconds``), so an idle worker makes no more ReceiveMessage
calls than kombu's loop (counted in tests/integration/test_prompt_receive.py
and benchmarks/consume.py). ``NANOGRID_SQS_PROMPT_RECEIVE=false`` turns all
of this off (kombu's loop: the benchmark's baseline).
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from typing import Any


class PromptReceive:
    """Mixin for kombu's SQS ``Channel``; the channel calls :meth:`_no_free_slot`."""

    #: a parked poll re-checks for a free slot this often if nothing resumed it, seconds
    park_recheck_s = 1.0

    # kombu's Channel provides these
    hub: Any
    qos: Any
    connection: Any
    transport_options: dict[str, Any]
    _tag_to_queue: dict[str, str]

    @property
    def prompt_receive(self) -> bool:
        return bool(self.transport_options.get("prompt_receive", True))

    # -- the poll chain (every method here runs on the hub's thread) -----------------------
    def _no_free_slot(self, queue: str) -> None:
        """Called instead of kombu's re-check loop when every prefetch slot is taken."""
        if not self.prompt_receive:
            super()._loop1(queue)  # type: ignore[misc]  # kombu's: call_soon, every pass
            return
        self.__dict__["_hub_thread"] = threading.get_ident()
        wakeup = self._watch_wakeups()
        parked = self._parked()
        if queue not in parked:
            parked[queue] = self.hub.call_later(self.park_recheck_s, self._resume, queue)
            # one more pass before the hub sleeps: an ack queued with call_soon during this
            # pass (solo acks inside the receive callback) runs at the top of the next one
            wakeup.wake()

    def _loop1(self, queue: str, messages_fetched: Any = None) -> None:
        """After a receive, the next one (kombu's, but before the hub next sleeps)."""
        if not self.prompt_receive or (self.connection.polling_interval and not messages_fetched):
            super()._loop1(queue, messages_fetched)  # type: ignore[misc]
            return
        # kombu uses call_soon, which waits for the 1 s poll when added during the ready
        # callbacks; a timer due now is fired before the poll whichever phase adds it
        self.hub.call_later(0, self._schedule_queue, queue)

    def _resume(self, queue: str) -> None:
        entry = self._parked().pop(queue, None)
        if entry is None:
            return  # resumed already: there is only ever one poll chain per queue
        entry.cancel()
        self._schedule_queue(queue)

    def _resume_parked(self) -> None:
        for queue in list(self._parked()):
            self.hub.call_later(0, self._resume, queue)  # before the hub next polls

    def _slot_freed(self) -> None:
        if not self.prompt_receive or self.hub is None:  # no event loop: nothing is polling
            return
        if self.__dict__.get("_hub_thread") == threading.get_ident():
            self._resume_parked()
        else:  # -P threads acks on its pool threads
            self.hub.call_soon(self._resume_parked)  # thread-safe
            wakeup = self.__dict__.get("_wakeup")
            if wakeup is not None:
                wakeup.wake()  # end the hub's poll now

    # -- what frees a slot -----------------------------------------------------------------
    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        try:
            super().basic_ack(delivery_tag, multiple)  # type: ignore[misc]
        finally:
            self._slot_freed()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().basic_reject(delivery_tag, requeue)  # type: ignore[misc]
        finally:
            self._slot_freed()

    def basic_qos(self, *args: Any, **kwargs: Any) -> None:
        super().basic_qos(*args, **kwargs)  # type: ignore[misc]
        self._slot_freed()

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)  # type: ignore[misc]
        entry = self._parked().pop(queue, None) if queue else None
        if entry is not None:  # a later consume starts a chain of its own
            entry.cancel()
        return result

    def close(self) -> None:
        wakeup = self.__dict__.pop("_wakeup", None)
        if wakeup is not None:
            with suppress(Exception):  # the hub may be closed already
                self.hub.remove(wakeup.reader)
            wakeup.close()
        super().close()  # type: ignore[misc]

    # -- helpers -----------------------------------------------------------------------------
    def _parked(self) -> dict[str, Any]:
        """Parked queue -> its re-check timer entry; touched on the hub's thread only."""
        parked = self.__dict__.get("_parked_polls")
        if parked is None:
            parked = self.__dict__["_parked_polls"] = {}
        return parked

    def _watch_wakeups(self) -> _Wakeup:
        """Have the hub poll our wake-up pipe (again, after a ``hub.reset()`` forgot it)."""
        wakeup = self.__dict__.get("_wakeup")
        if wakeup is None:
            wakeup = self.__dict__["_wakeup"] = _Wakeup()
        if wakeup.reader not in self.hub.readers:
            self.hub.add_reader(wakeup.reader, wakeup.drain)
        return wakeup


class _Wakeup:
    """A pipe the hub reads: a byte written to it ends the hub's poll (see the module doc)."""

    def __init__(self) -> None:
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.reader, False)
        os.set_blocking(self.writer, False)
        self._lock = threading.Lock()  # a pool thread must never write to a closed (reused) fd
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                with suppress(BlockingIOError):  # full: a wake-up is pending anyway
                    os.write(self.writer, b"\0")

    def drain(self) -> None:
        with suppress(BlockingIOError):
            os.read(self.reader, 4096)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.reader)
                os.close(self.writer)
