"""The prompt receive's poll chain on kombu's real event loop, with a fake channel (no SQS).

The fake stands in for kombu's SQS channel: ``_schedule_queue`` "receives"
(records the call) when the QoS has a free slot and parks otherwise, as
nanogrid_celery/delivery/sqs_transport.py does; acks free the slot.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from kombu.asynchronous import Hub

from nanogrid_celery.delivery.prompt_receive import PromptReceive

from .event_loop import spin


class FakeSQSChannel:
    def __init__(self, hub: Hub, prompt: bool = True) -> None:
        self.hub = hub
        self.transport_options = {"prompt_receive": prompt}
        self.connection = SimpleNamespace(polling_interval=0)
        self._tag_to_queue: dict[str, str] = {"tag": "q"}
        self.busy = 0  # messages held; one prefetch slot
        self.qos = SimpleNamespace(can_consume=lambda: self.busy < 1)
        self.receives: list[float] = []
        self.closed = False

    def _schedule_queue(self, queue: str) -> None:
        if self.qos.can_consume():
            self.receives.append(time.monotonic())
            self.busy += 1  # the receive returned one message
            self._loop1(queue, 1)
        else:
            self._no_free_slot(queue)

    def _loop1(self, queue: str, messages_fetched: Any = None) -> None:  # kombu's
        self.hub.call_soon(self._schedule_queue, queue)

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        self.busy -= 1

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self.busy -= 1

    def basic_qos(self, *args: Any, **kwargs: Any) -> None:
        pass

    def basic_cancel(self, consumer_tag: str) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Channel(PromptReceive, FakeSQSChannel):
    park_recheck_s = 5.0  # longer than any wait below: only an ack may resume the poll


def started(hub: Hub, prompt: bool = True) -> Channel:
    channel = Channel(hub, prompt)
    hub.call_soon(channel._schedule_queue, "q")  # what basic_consume does
    spin(hub, 0.3)
    assert len(channel.receives) == 1 and channel.busy == 1
    return channel


def test_a_full_channel_parks_instead_of_rechecking_every_pass(hub: Hub) -> None:
    channel = started(hub)
    assert list(channel._parked()) == ["q"]
    spin(hub, 0.5)
    assert len(channel.receives) == 1, "no receive while the slot is taken"


def test_an_ack_on_the_hub_thread_resumes_the_poll_before_the_hub_sleeps(hub: Hub) -> None:
    channel = started(hub)
    spin(hub, 0.2)  # let the hub settle into its 1 s poll timeout
    acked = time.monotonic()
    hub.call_soon(channel.basic_ack, "tag")  # how Celery acks: a ready callback
    spin(hub, 2.0, until=lambda: len(channel.receives) == 2)
    assert len(channel.receives) == 2
    assert channel.receives[1] - acked < 0.2, "the next receive waited for a poll timeout"
    assert channel._parked() == {"q": channel._parked()["q"]}, "parked again: slot taken"


def test_an_ack_from_a_pool_thread_wakes_the_hub(hub: Hub) -> None:
    channel = started(hub)
    acked: list[float] = []

    def ack_later() -> None:
        time.sleep(0.3)
        acked.append(time.monotonic())
        channel.basic_ack("tag")

    threading.Thread(target=ack_later).start()
    spin(hub, 3.0, until=lambda: len(channel.receives) == 2)
    assert len(channel.receives) == 2
    assert channel.receives[1] - acked[0] < 0.2, "a -P threads ack waited for a hub tick"


def test_one_poll_chain_however_many_resumes(hub: Hub) -> None:
    channel = started(hub)
    channel.basic_reject("tag")  # frees the slot ...
    channel._slot_freed()  # ... and more resume requests arrive
    channel.basic_qos(prefetch_count=1)
    spin(hub, 0.5)
    assert len(channel.receives) == 2, "exactly one receive for one freed slot"
    assert list(channel._parked()) == ["q"]


def test_a_parked_poll_rechecks_on_its_own(hub: Hub) -> None:
    channel = started(hub)
    channel.park_recheck_s = 0.2
    channel._parked().pop("q").cancel()
    channel._no_free_slot("q")  # parked again, with the short re-check
    channel.busy = 0  # freed without an ack we hear about
    spin(hub, 1.0, until=lambda: len(channel.receives) == 2)
    assert len(channel.receives) == 2


def test_turned_off_it_is_kombus_loop(hub: Hub) -> None:
    channel = started(hub, prompt=False)
    assert channel._parked() == {}, "kombu re-checks with call_soon instead"
    assert channel.__dict__.get("_wakeup") is None


def test_close_releases_the_wakeup_pipe(hub: Hub) -> None:
    channel = started(hub)
    reader = channel.__dict__["_wakeup"].reader
    assert reader in hub.readers
    channel.close()
    assert channel.closed and reader not in hub.readers
    channel._slot_freed()  # a late ack from a pool thread must not touch a closed fd
