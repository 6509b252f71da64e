"""While every slot is busy, the next message is received and held for the slot that frees first.

With the prompt receive (``prompt_receive.py``) a freed slot asks SQS at once,
but the ReceiveMessage round trip still comes after the run: on a ``-c 1``
worker with two clients each message waited for the other client's run and
then for its own receive (queue_ms p50 24.9 ms at 2 clients, 10 ms of it the
pick-up at one client; benchmarks/RESULTS.md, consumer matrix). Here, when a
delivery fills the last slot, one receive goes out at once; a message it
brings is *held* in the worker's main process and handed to the slot the
moment an ack or requeue frees it (before the hub next sleeps), so the
receive overlaps the run instead of following it. Measured in one run of
benchmarks/consume.py (RESULTS.md, consumer matrix; a machine ~2x slower
than the one above: single-client latency 40 ms, not 18): ``-c 1`` with 2
clients, queue_ms p50 58.6 -> 38.5 ms (0.66x) and 25.5 -> 31.4 runs/s; with 4
clients 121 -> 100 ms and 28.1 -> 31.1 runs/s; ``-c 2`` unchanged (0.98x
worst); none of 540 look-ahead runs given back. The slot's idle time while a
message waited (tests' measure) fell from 26-35 to 13-14 ms p50. Pushing a
look-ahead message's visibility out at every hand-over, instead of only for
a run still going a third of its visibility later, cost one more SQS call
per run: 29-30 against 35-37 runs/s in the tests' two-client loop, in two
runs minutes apart.

Holding a message is the prefetch problem Celery users know (a slow run keeps
a second message hostage while another worker idles), so the hold is bounded
and adaptive, and every held message can still be lost at most briefly:

* **Only for short runs.** A channel looks ahead only once it has seen
  :attr:`LookAhead.min_samples` busy periods (all slots taken -> one frees)
  and their median is within the hold; a queue of long runs is consumed as
  with prefetch 1.
* **Bounded hold.** A held message not handed over within ``hold`` seconds
  (``NANOGRID_SQS_LOOK_AHEAD_HOLD_MS``, 500) is given back
  (ChangeMessageVisibility 0) for another worker, the channel parks until a
  slot frees, and it looks ahead again only after a cool-down that doubles
  with each give-back (1 s to 60 s) and resets on a hand-over.
* **Receive counts.** Each give-back counts as a receive towards the redrive
  policy's ``maxReceiveCount`` (``dlq_max_receives``): a message that could
  have run is never dead-lettered for it, because one received
  ``max_receives - reserve_receives`` times or more is kept until a slot
  frees instead of given back, leaving at least ``reserve_receives`` real
  attempts (the idempotency gate's ``max_starts`` covers the rest).
* **A dead worker.** The look-ahead receive hides its message for
  ``NANOGRID_SQS_LOOK_AHEAD_VISIBILITY_S`` (30 s; at least the hold + 5 s),
  not the queue's visibility timeout (600 s): a SIGKILLed worker's held
  message is visible again within that. A handed-over message still running
  a third of that later gets the queue's timeout (a ChangeMessageVisibility
  on the channel's background thread, ``async_ack.py``) and the visibility
  heartbeat takes over as for any delivery; a short run is acked first and
  costs no extra call.
* **Idle cost.** An idle worker has a free slot and long-polls as before
  (counted in tests/integration/test_prompt_receive.py). A look-ahead waits
  :attr:`LookAhead.wait_s` (1 s) for a message, once per busy period: a busy
  worker on an empty queue makes at most one extra ReceiveMessage per run.
* **Shutdown.** A held message is given back when its consumer is cancelled
  or the channel closes (the background thread's flush sends it).

One held message per channel, whatever the concurrency; every method here runs
on the hub's thread (``_resume_parked`` is the hub-side half of a freed slot).
``NANOGRID_SQS_LOOK_AHEAD_HOLD_MS=0`` turns it off.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from vine import promise

from nanogrid_celery.common.logs import get_logger

log = get_logger(__name__)

#: logged once per message given back (counted by benchmarks/consume.py and the tests)
GIVEN_BACK = "look-ahead message given back"


@dataclass
class _Held:
    queue: str
    q_url: str
    messages: dict[str, Any]
    timer: Any | None  # None: kept until a slot frees (too many receives to give it back)


@dataclass
class _State:
    armed: bool = True  # may look ahead: cleared by a look-ahead, set again by a freed slot
    inflight: str | None = None  # the queue a look-ahead receive is out for
    held: _Held | None = None
    full_since: float | None = None
    periods: deque[float] = field(default_factory=lambda: deque(maxlen=16))
    cooldown_s: float = 0.0
    cooldown_until: float = 0.0
    given_back: int = 0


class LookAhead:
    """Mixin for kombu's SQS ``Channel``, before :class:`PromptReceive` in its bases."""

    #: busy periods seen before the first look-ahead
    min_samples = 4
    #: how long a look-ahead receive waits for a message, seconds (SQS: whole seconds)
    wait_s = 1
    #: receives a kept message must still have before the redrive policy dead-letters it
    reserve_receives = 2
    base_cooldown_s = 1.0
    max_cooldown_s = 60.0

    # kombu's Channel (and PromptReceive, AsyncAck, our Channel) provide these
    hub: Any
    qos: Any
    transport_options: dict[str, Any]
    _active_queues: list[str]
    _tag_to_queue: dict[str, str]

    @property
    def look_ahead_hold_s(self) -> float:
        return float(self.transport_options.get("look_ahead_hold_s", 0.5))

    @property
    def look_ahead_visibility_s(self) -> int:
        """Never shorter than a hold plus a margin: a held message must stay ours."""
        asked = int(self.transport_options.get("look_ahead_visibility_s", 30))
        return max(asked, math.ceil(self.look_ahead_hold_s) + 5)

    @property
    def look_ahead_max_receives(self) -> int:
        return int(self.transport_options.get("max_receives", 0))

    # -- when every slot is taken ------------------------------------------------------------
    def _no_free_slot(self, queue: str) -> None:
        st = self._look_ahead_state()
        now = time.monotonic()
        if st.full_since is None:
            st.full_since = now
        if self._may_look_ahead(st, now):
            st.armed = False
            self._look_ahead(queue)
        else:
            super()._no_free_slot(queue)  # type: ignore[misc]  # park until a slot frees

    def _may_look_ahead(self, st: _State, now: float) -> bool:
        hold = self.look_ahead_hold_s
        if hold <= 0 or not self.prompt_receive:  # type: ignore[attr-defined]
            return False
        if not st.armed or st.inflight is not None or st.held is not None:
            return False
        if now < st.cooldown_until or len(st.periods) < self.min_samples:
            return False
        return statistics.median(st.periods) <= hold

    def _look_ahead(self, queue: str) -> None:
        st = self._look_ahead_state()
        st.inflight = queue
        try:
            q_url = self._new_queue(queue)  # type: ignore[attr-defined]
            qname = self.canonical_queue_name(queue)  # type: ignore[attr-defined]
            done = promise(
                self._look_ahead_done,
                (queue, q_url),
                on_error=self._look_ahead_failed,  # called with (queue, q_url, exc)
            )
            self.asynsqs(queue=qname).receive_message(  # type: ignore[attr-defined]
                qname,
                q_url,
                number_messages=1,
                visibility_timeout=self.look_ahead_visibility_s,
                wait_time_seconds=self.wait_s,
                callback=done,
            )
        except Exception as exc:
            self._look_ahead_failed(queue, None, exc)

    def _look_ahead_failed(self, queue: str, q_url: str | None, exc: BaseException) -> None:
        self._look_ahead_state().inflight = None
        self._poll_failed(queue, exc)  # type: ignore[attr-defined]  # logged, retried, backoff

    def _look_ahead_done(self, queue: str, q_url: str, messages: Any) -> None:
        st = self._look_ahead_state()
        st.inflight = None
        msgs = messages.get("Messages") if isinstance(messages, dict) else None
        if not msgs:  # nothing within wait_s (or a failed call): go on as kombu would
            self.hub.call_later(0, self._schedule_queue, queue)  # type: ignore[attr-defined]
            return
        if queue not in self._active_queues:  # cancelled meanwhile
            self._give_back(queue, q_url, messages, "consumer cancelled")
            return
        if self.qos.can_consume():  # a slot freed while the receive was out
            self._hand_over(queue, q_url, messages)
            return
        timer = None
        if not self._kept(msgs):
            timer = self.hub.call_later(self.look_ahead_hold_s, self._hold_expired)
        st.held = _Held(queue, q_url, messages, timer)

    def _kept(self, msgs: list[dict[str, Any]]) -> bool:
        """Received too often to give back without risking the redrive policy (module doc)."""
        limit = self.look_ahead_max_receives
        if limit <= 0:
            return False
        count = max(int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)) for m in msgs)
        return count + self.reserve_receives >= limit

    # -- a freed slot ------------------------------------------------------------------------
    def _resume_parked(self) -> None:
        st = self._look_ahead_state()
        if st.full_since is not None:
            st.periods.append(time.monotonic() - st.full_since)
            st.full_since = None
        st.armed = True
        if st.held is not None:
            # not from inside the ack: solo acks inside its delivery, and a hand-over there
            # would run the next task inside this one
            self.hub.call_later(0, self._deliver_held)
        super()._resume_parked()  # type: ignore[misc]

    def _take_held(self, queue: str | None = None) -> _Held | None:
        """The held message (of ``queue``, if given), no longer held nor timed."""
        st = self._look_ahead_state()
        held = st.held
        if held is None or (queue is not None and held.queue != queue):
            return None
        st.held = None
        if held.timer is not None:
            held.timer.cancel()
        return held

    def _deliver_held(self) -> None:
        if not self.qos.can_consume():
            return
        held = self._take_held()
        if held is None:
            return
        self._look_ahead_state().cooldown_s = 0.0
        self._hand_over(held.queue, held.q_url, held.messages)

    def _hand_over(self, queue: str, q_url: str, messages: dict[str, Any]) -> None:
        """Deliver as kombu's receive callback would, then go on with the poll chain."""
        receipts = [msg["ReceiptHandle"] for msg in messages["Messages"]]
        # a short run is acked long before its look-ahead visibility runs out: only one still
        # running after a third of it is given the queue's timeout (no extra call per run)
        self.hub.call_later(
            self.look_ahead_visibility_s / 3, self._extend_unacked, queue, q_url, receipts
        )
        try:
            fetched = self._on_messages_ready(q_url, queue, messages)  # type: ignore[attr-defined]
        except Exception as exc:
            self._poll_failed(queue, exc)  # type: ignore[attr-defined]
            return
        self._loop1(queue, fetched)  # type: ignore[attr-defined]

    def _extend_unacked(self, queue: str, q_url: str, receipts: list[str]) -> None:
        """From the look-ahead's visibility to the queue's, for a delivery not acked yet.

        The visibility heartbeat (``visibility.py``) keeps extending it from there.
        """
        unacked = self._unacked_receipts()
        client = self.sqs(queue=self.canonical_queue_name(queue))  # type: ignore[attr-defined]
        for receipt in receipts:
            if unacked is None or receipt in unacked:
                self._deleter().submit_visibility(  # type: ignore[attr-defined]
                    client,
                    q_url,
                    receipt,
                    int(self.visibility_timeout),  # type: ignore[attr-defined]
                )

    def _unacked_receipts(self) -> set[str] | None:
        """Receipt handles of deliveries not acked or requeued (None: cannot tell, extend)."""
        try:
            delivered, dirty = self.qos._delivered, self.qos._dirty  # kombu's virtual QoS
            return {
                message.delivery_info["sqs_message"]["ReceiptHandle"]
                for tag, message in list(delivered.items())
                if tag not in dirty
            }
        except Exception:
            return None

    # -- giving a message back ---------------------------------------------------------------
    def _hold_expired(self) -> None:
        if self.qos.can_consume():  # freed, and the hand-over not run yet
            self._deliver_held()
            return
        held = self._take_held()
        if held is None:
            return
        st = self._look_ahead_state()
        self._give_back(held.queue, held.q_url, held.messages, "hold expired")
        st.cooldown_s = min(self.max_cooldown_s, max(self.base_cooldown_s, 2 * st.cooldown_s))
        st.cooldown_until = time.monotonic() + st.cooldown_s
        self._no_free_slot(held.queue)  # not armed: parks until a slot frees

    def _give_back(self, queue: str, q_url: str, messages: dict[str, Any], why: str) -> None:
        st = self._look_ahead_state()
        client = self.sqs(queue=self.canonical_queue_name(queue))  # type: ignore[attr-defined]
        for msg in messages.get("Messages") or []:
            st.given_back += 1
            request_id = self._request_id(msg)
            log.info(f"{GIVEN_BACK}: %s", why, queue=queue, request_id=request_id)
            self._deleter().submit_visibility(client, q_url, msg["ReceiptHandle"], 0, request_id)  # type: ignore[attr-defined]

    def _request_id(self, msg: dict[str, Any]) -> str | None:
        with suppress(Exception):
            body = self._decode_python_message_body(msg["Body"])  # type: ignore[attr-defined]
            return json.loads(body)["headers"]["id"]
        return None

    def _release_held(self, queue: str | None = None) -> None:
        held = self._take_held(queue)
        if held is None:
            return
        self._give_back(held.queue, held.q_url, held.messages, "consumer stopped")

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)  # type: ignore[misc]
        if queue is not None:
            self._release_held(queue)
        return result

    def close(self) -> None:
        self._release_held()  # queued before the background thread's closing flush
        super().close()  # type: ignore[misc]

    def _look_ahead_state(self) -> _State:
        st = self.__dict__.get("_look_ahead_st")
        if st is None:
            st = self.__dict__["_look_ahead_st"] = _State()
        return st
