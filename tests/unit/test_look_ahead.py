"""The look-ahead on kombu's real event loop, with a fake channel (no SQS).

The fake stands in for kombu's SQS channel under our mixins: a normal receive
returns one message at once (a backlog), a look-ahead receive waits until the
test answers it, acks free the one prefetch slot, and SQS calls sent on the
channel's background thread (visibility changes) are recorded.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

from kombu.asynchronous import Hub

from nanogrid_celery.delivery.look_ahead import LookAhead
from nanogrid_celery.delivery.prompt_receive import PromptReceive

from .event_loop import spin


class FakeDeleter:
    def __init__(self) -> None:
        self.visibility: list[tuple[str, int]] = []

    def submit_visibility(
        self, client: Any, queue_url: str, receipt: str, seconds: int, request_id: Any = None
    ) -> None:
        self.visibility.append((receipt, seconds))


class FakeSQSChannel:
    visibility_timeout = 600

    def __init__(self, hub: Hub, hold_s: float, max_receives: int = 5) -> None:
        self.hub = hub
        self.transport_options = {
            "prompt_receive": True,
            "look_ahead_hold_s": hold_s,
            "look_ahead_visibility_s": 30,
            "max_receives": max_receives,
        }
        self.connection = SimpleNamespace(polling_interval=0)
        self._tag_to_queue = {"tag": "q"}
        self._active_queues = ["q"]
        self.busy = 0  # messages delivered and not acked; one prefetch slot
        self.qos = SimpleNamespace(
            can_consume=lambda: self.busy < 1,
            _delivered={},  # delivery tag -> message, as kombu's virtual QoS keeps them
            _dirty=set(),
        )
        self.tags = 0
        self.receives = 0  # normal receives (each brings one message)
        self.delivered: list[str] = []
        self.delivered_at: list[float] = []
        self.look_aheads: list[tuple[Any, dict[str, Any]]] = []  # (callback, receive kwargs)
        self.failures: list[BaseException] = []
        self.deleter = FakeDeleter()

    # kombu's poll chain, as sqs_transport.Channel has it
    def _schedule_queue(self, queue: str) -> None:
        if queue not in self._active_queues:
            return
        if self.qos.can_consume():
            self.receives += 1
            self._on_messages_ready("url", queue, message(f"n{self.receives}"))
            self._loop1(queue, 1)
        else:
            self._no_free_slot(queue)

    def _loop1(self, queue: str, messages_fetched: Any = None) -> None:
        self.hub.call_soon(self._schedule_queue, queue)

    def _on_messages_ready(self, q_url: str, queue: str, messages: dict[str, Any]) -> int:
        for msg in messages["Messages"]:
            self.busy += 1
            self.tags += 1
            delivered = SimpleNamespace(delivery_info={"sqs_message": msg})
            self.qos._delivered[self.tags] = delivered
            self.delivered.append(msg["ReceiptHandle"])
            self.delivered_at.append(time.monotonic())
        return len(messages["Messages"])

    def asynsqs(self, queue: str) -> Any:
        def receive_message(qname: str, q_url: str, callback: Any, **kwargs: Any) -> None:
            self.look_aheads.append((callback, kwargs))

        return SimpleNamespace(receive_message=receive_message)

    def sqs(self, queue: str | None = None) -> str:
        return "client"

    def _new_queue(self, queue: str) -> str:
        return "url"

    def canonical_queue_name(self, queue: str) -> str:
        return queue

    def _deleter(self) -> FakeDeleter:
        return self.deleter

    def _poll_failed(self, queue: str, exc: BaseException) -> None:
        self.failures.append(exc)

    def _decode_python_message_body(self, body: str) -> str:
        return body

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        self.busy -= 1
        self.qos._delivered.pop(next(iter(self.qos._delivered)))  # the oldest: one slot

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self.busy -= 1

    def basic_qos(self, *args: Any, **kwargs: Any) -> None:
        pass

    def basic_cancel(self, consumer_tag: str) -> None:
        self._active_queues.remove(self._tag_to_queue[consumer_tag])

    def close(self) -> None:
        pass


class Channel(LookAhead, PromptReceive, FakeSQSChannel):
    park_recheck_s = 5.0  # longer than any wait below: only an ack may resume the poll


def message(receipt: str, receives: int = 1) -> dict[str, Any]:
    body = json.dumps({"headers": {"id": f"req-{receipt}"}})
    return {
        "Messages": [
            {
                "ReceiptHandle": receipt,
                "Body": body,
                "Attributes": {"ApproximateReceiveCount": str(receives)},
            }
        ]
    }


def ack(hub: Hub, channel: Channel) -> float:
    """Ack as Celery does (a ready callback); returns when."""
    at = time.monotonic()
    hub.call_soon(channel.basic_ack, "tag")
    return at


def warmed(hub: Hub, hold_s: float = 0.3, run_s: float = 0.01, **kw: Any) -> Channel:
    """A channel that has seen min_samples busy periods of ``run_s``; its slot is taken again.

    The periods are given, not lived: the test's own hub passes take up to the hub's 1 s
    poll timeout (test_busy_periods_are_measured_from_full_to_freed measures one).
    """
    channel = Channel(hub, hold_s, **kw)
    hub.call_soon(channel._schedule_queue, "q")  # what basic_consume does
    spin(hub, 0.2, until=lambda: channel.busy == 1)
    assert not channel.look_aheads, "looked ahead before any busy period"
    channel._look_ahead_state().periods.extend([run_s] * channel.min_samples)
    ack(hub, channel)
    spin(hub, 0.5, until=lambda: channel.receives == 2 and channel.busy == 1)
    spin(hub, 0.3, until=lambda: bool(channel.look_aheads) or bool(channel._parked()))
    assert channel.busy == 1
    return channel


def test_busy_periods_are_measured_from_full_to_freed(hub: Hub) -> None:
    channel = Channel(hub, 0.3)
    hub.call_soon(channel._schedule_queue, "q")
    spin(hub, 0.2, until=lambda: channel.busy == 1)
    time.sleep(0.05)
    channel.basic_ack("tag")  # on the hub's thread, as prefork's ack
    (period,) = channel._look_ahead_state().periods
    assert 0.05 <= period < 0.5


def test_the_next_message_is_received_during_the_run_and_handed_over_by_the_ack(
    hub: Hub,
) -> None:
    channel = warmed(hub)
    assert len(channel.look_aheads) == 1, "a full channel with short runs looks ahead"
    callback, kwargs = channel.look_aheads[0]
    assert kwargs["visibility_timeout"] == 30 and kwargs["wait_time_seconds"] == 1
    callback(message("la1"))  # arrives while the slot is taken: held, not delivered
    assert "la1" not in channel.delivered and channel.busy == 1
    spin(hub, 0.2)  # the hub settles into its poll timeout
    acked = ack(hub, channel)
    spin(hub, 2.0, until=lambda: "la1" in channel.delivered)
    assert "la1" in channel.delivered
    assert channel.delivered_at[-1] - acked < 0.1, "the held message waited for a hub tick"
    assert channel.deleter.visibility == [], "a short run costs no visibility call"
    assert channel.receives == 2, "no extra normal receive"
    spin(hub, 0.1)
    assert len(channel.look_aheads) == 2, "and it looks ahead again for the next run"


def test_a_message_arriving_after_the_slot_freed_is_delivered_at_once(hub: Hub) -> None:
    channel = warmed(hub)
    callback, _ = channel.look_aheads[0]
    ack(hub, channel)
    spin(hub, 0.1)
    assert channel.busy == 0 and channel.receives == 2, (
        "the receive in flight is the chain's next link: no second receive"
    )
    callback(message("la1"))
    assert channel.delivered[-1] == "la1" and channel.busy == 1


def test_a_hold_that_expires_gives_the_message_back_and_cools_down(hub: Hub) -> None:
    channel = warmed(hub, hold_s=0.1)
    channel.base_cooldown_s = 60.0  # longer than this test: the hub's passes take up to 1 s
    callback, _ = channel.look_aheads[0]
    callback(message("la1"))
    spin(hub, 0.5)  # the run goes on past the hold
    assert channel.deleter.visibility == [("la1", 0)], "given back for another worker"
    assert "la1" not in channel.delivered
    assert list(channel._parked()) == ["q"], "parked until a slot frees"
    st = channel._look_ahead_state()
    assert st.given_back == 1 and st.cooldown_s == channel.base_cooldown_s
    n = channel.receives
    ack(hub, channel)
    spin(hub, 0.5, until=lambda: channel.receives == n + 1)
    assert channel.receives == n + 1, "the freed slot takes a normal receive"
    spin(hub, 0.1)
    assert len(channel.look_aheads) == 1, "no look-ahead during the cool-down"


def test_a_message_received_too_often_is_kept_not_given_back(hub: Hub) -> None:
    """Receive 3 of a redrive limit of 5: one more give-back could dead-letter a message that
    never ran, so it waits for the slot however long the run takes."""
    channel = warmed(hub, hold_s=0.1)
    callback, _ = channel.look_aheads[0]
    callback(message("la1", receives=3))
    spin(hub, 0.4)
    assert channel.deleter.visibility == [] and "la1" not in channel.delivered
    ack(hub, channel)
    spin(hub, 0.5, until=lambda: "la1" in channel.delivered)
    assert "la1" in channel.delivered
    assert channel.deleter.visibility == []


def test_long_runs_are_not_looked_ahead(hub: Hub) -> None:
    channel = warmed(hub, hold_s=0.02, run_s=0.06)
    assert channel.look_aheads == [], "busy periods longer than the hold: prefetch 1"
    assert list(channel._parked()) == ["q"]


def test_an_empty_look_ahead_parks_until_the_slot_frees(hub: Hub) -> None:
    channel = warmed(hub)
    callback, _ = channel.look_aheads[0]
    callback({})  # nothing within wait_s
    spin(hub, 0.2)
    assert len(channel.look_aheads) == 1, "one look-ahead per busy period"
    assert list(channel._parked()) == ["q"]
    n = channel.receives
    ack(hub, channel)
    spin(hub, 0.5, until=lambda: channel.receives == n + 1)
    assert channel.receives == n + 1


def test_cancel_and_close_give_a_held_message_back(hub: Hub) -> None:
    channel = warmed(hub)
    channel.look_aheads[0][0](message("la1"))
    channel.basic_cancel("tag")
    assert channel.deleter.visibility == [("la1", 0)]
    other = warmed(Hub())
    other.look_aheads[0][0](message("la2"))
    other.close()
    assert other.deleter.visibility == [("la2", 0)]


def test_a_look_ahead_answered_after_cancel_gives_its_message_back(hub: Hub) -> None:
    channel = warmed(hub)
    callback, _ = channel.look_aheads[0]
    channel.basic_cancel("tag")
    callback(message("la1"))
    assert channel.deleter.visibility == [("la1", 0)] and "la1" not in channel.delivered


def test_a_failed_look_ahead_is_a_failed_poll(hub: Hub) -> None:
    channel = warmed(hub)
    callback, _ = channel.look_aheads[0]
    callback.throw(RuntimeError("QueueDoesNotExist"))
    assert [str(e) for e in channel.failures] == ["QueueDoesNotExist"]
    assert channel._look_ahead_state().inflight is None


def test_hold_zero_turns_it_off(hub: Hub) -> None:
    channel = warmed(hub, hold_s=0)
    spin(hub, 0.1)
    assert channel.look_aheads == [] and list(channel._parked()) == ["q"]


class ShortVisibility(Channel):
    @property
    def look_ahead_visibility_s(self) -> int:
        return 1  # the extension is due a third of it after the hand-over


def test_a_long_run_from_a_look_ahead_gets_the_queues_visibility(hub: Hub) -> None:
    """The look-ahead's short visibility must never expire under a run still going."""
    channel = ShortVisibility(hub, 0.3)
    hub.call_soon(channel._schedule_queue, "q")
    spin(hub, 0.2, until=lambda: channel.busy == 1)
    channel._look_ahead_state().periods.extend([0.01] * channel.min_samples)
    ack(hub, channel)
    spin(hub, 0.5, until=lambda: bool(channel.look_aheads))
    channel.look_aheads[0][0](message("la1"))  # held
    ack(hub, channel)  # handed over; now it runs long
    spin(hub, 0.5, until=lambda: "la1" in channel.delivered)
    spin(hub, 2.0, until=lambda: bool(channel.deleter.visibility))
    assert channel.deleter.visibility == [("la1", 600)]


def test_an_acked_look_ahead_message_is_not_extended(hub: Hub) -> None:
    channel = warmed(hub)
    channel.look_aheads[0][0](message("la1"))
    ack(hub, channel)
    spin(hub, 0.5, until=lambda: "la1" in channel.delivered)
    assert channel._unacked_receipts() == {"la1"}
    channel._extend_unacked("q", "url", ["la1"])
    assert channel.deleter.visibility == [("la1", 600)], "still running: extended"
    channel.basic_ack("tag")
    channel._extend_unacked("q", "url", ["la1"])
    assert channel.deleter.visibility == [("la1", 600)], "acked: nothing more to extend"
