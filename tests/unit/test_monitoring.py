"""Issue #6 units: metrics bookkeeping, the task-sent event, the consumer wiring, log stamping."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from nanogrid_celery.common import logs
from nanogrid_celery.delivery.deadletter import DeadLetterConsumer
from nanogrid_celery.monitoring import prometheus as metrics
from nanogrid_celery.monitoring import redis_events as events_consumer
from nanogrid_celery.monitoring.sent_events import sent_event_fields
from nanogrid_celery.result import ExecutionResult, Status
from nanogrid_celery.service.consumer import WorkerConsumer


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def result(**kw) -> ExecutionResult:
    base = dict(request_id="r1", runtime="python", status=Status.SUCCESS, start="warm")
    base.update(kw)
    return ExecutionResult(**base)


# -- metrics ---------------------------------------------------------------------------------
def test_observe_counts_a_run_and_its_latencies():
    before = {
        "runs": sample("nanogrid_runs_total", runtime="python", status="success"),
        "warm": sample("nanogrid_container_starts_total", runtime="python", start="warm"),
        "run": sample("nanogrid_run_seconds_count", runtime="python"),
        "start": sample("nanogrid_container_start_seconds_sum", runtime="python", start="warm"),
    }
    metrics.observe(
        result(queue_ms=20.0, start_ms=12.0, duration_ms=80.0, total_ms=130.0, attempts=1)
    )
    assert sample("nanogrid_runs_total", runtime="python", status="success") == before["runs"] + 1
    assert (
        sample("nanogrid_container_starts_total", runtime="python", start="warm")
        == before["warm"] + 1
    )
    assert sample("nanogrid_run_seconds_count", runtime="python") == before["run"] + 1
    start_sum = sample("nanogrid_container_start_seconds_sum", runtime="python", start="warm")
    assert start_sum == pytest.approx(before["start"] + 0.012)


def test_observe_a_rejected_run_with_a_made_up_runtime_stays_bounded():
    before = sample("nanogrid_runs_total", runtime="other", status="rejected")
    metrics.observe(result(runtime="brainfuck-9000", status=Status.REJECTED, start=None))
    assert sample("nanogrid_runs_total", runtime="other", status="rejected") == before + 1
    assert sample("nanogrid_runs_total", runtime="brainfuck-9000", status="rejected") == 0


def test_observe_counts_tuner_adjustments_and_retries():
    tuned = sample("nanogrid_tuner_adjustments_total", runtime="cpp")
    retries = sample("nanogrid_run_retries_total", runtime="cpp")
    metrics.observe(result(runtime="cpp", memory_tuned=True, attempts=2))
    metrics.observe(result(runtime="cpp", memory_tuned=False, attempts=1))
    assert sample("nanogrid_tuner_adjustments_total", runtime="cpp") == tuned + 1
    assert sample("nanogrid_run_retries_total", runtime="cpp") == retries + 1


def test_observe_reads_optional_fields_defensively():
    """A result type without start_ms/memory_tuned (an older build) is still counted."""
    legacy = SimpleNamespace(
        runtime="python",
        status=Status.TIMEOUT,
        start="cold",
        attempts=1,
        queue_ms=None,
        compile_ms=None,
        duration_ms=None,
        total_ms=None,
    )
    before = sample("nanogrid_runs_total", runtime="python", status="timeout")
    metrics.observe(legacy)
    assert sample("nanogrid_runs_total", runtime="python", status="timeout") == before + 1


def test_sample_pool_copies_each_state():
    figures = {"idle": 2, "busy": 1, "starting": 0, "target": 3, "grown": 2, "shrunk": 0}
    pool = SimpleNamespace(stats=lambda: {"python": figures})
    grew = sample("nanogrid_pool_resizes_total", runtime="python", direction="grow") or 0
    metrics.sample_pool(pool)
    assert sample("nanogrid_pool_containers", runtime="python", state="idle") == 2
    assert sample("nanogrid_pool_containers", runtime="python", state="busy") == 1
    assert sample("nanogrid_pool_target", runtime="python") == 3
    metrics.sample_pool(pool)  # the same figures again: counted once
    assert sample("nanogrid_pool_resizes_total", runtime="python", direction="grow") == grew + 2


# -- events ----------------------------------------------------------------------------------
def test_task_sent_event_has_celerys_fields():
    headers = {
        "id": "req-1",
        "task": "nanogrid.run_code",
        "argsrepr": "()",
        "kwargsrepr": "{'request_id': 'req-1'}",
        "retries": 0,
        "eta": None,
        "expires": None,
        "root_id": "req-1",
        "parent_id": None,
    }
    fields = sent_event_fields(headers, "", "nanogrid-runs")
    assert fields["uuid"] == "req-1" and fields["name"] == "nanogrid.run_code"
    assert fields["kwargs"] == "{'request_id': 'req-1'}" and fields["args"] == "()"
    assert fields["queue"] == fields["routing_key"] == "nanogrid-runs"


def test_worker_consumer_moves_control_to_redis_and_keeps_dead_letters():
    assert issubclass(WorkerConsumer, events_consumer.RedisEventsMixin)
    assert issubclass(WorkerConsumer, DeadLetterConsumer)
    steps = WorkerConsumer.Blueprint.default_steps
    assert events_consumer.REDIS_CONTROL in steps
    assert events_consumer.STOCK_CONTROL not in steps
    assert "celery.worker.consumer.events:Events" in steps


class StockConsumer:
    """What the mixin builds on in celery's Consumer: the next-pass flush and shutdown."""

    def __init__(self, hub) -> None:
        self.hub = hub
        self.flushes = self.next_pass = 0
        self.shut_down = False

    def on_send_event_buffered(self) -> None:
        self.next_pass += 1

    def _flush_events(self) -> None:
        self.flushes += 1

    def shutdown(self) -> None:
        self.shut_down = True


class Coalescing(events_consumer.RedisEventsMixin, StockConsumer):
    pass


@pytest.fixture
def flush_ms(monkeypatch):
    from nanogrid_celery.config import get_settings

    def set_ms(ms: int) -> None:
        monkeypatch.setenv("NANOGRID_EVENTS_FLUSH_MS", str(ms))
        get_settings.cache_clear()

    yield set_ms
    monkeypatch.delenv("NANOGRID_EVENTS_FLUSH_MS", raising=False)
    get_settings.cache_clear()


def test_task_events_of_several_runs_go_out_in_one_flush(hub, flush_ms):
    from tests.unit.event_loop import spin

    flush_ms(100)
    c = Coalescing(hub)
    for _ in range(9):  # received, started, succeeded of three runs
        c.on_send_event_buffered()
    spin(hub, 0.05)
    assert c.flushes == 0 and c.next_pass == 0
    spin(hub, 0.5, until=lambda: c.flushes)
    assert c.flushes == 1
    c.on_send_event_buffered()  # a later event starts a new interval
    spin(hub, 0.5, until=lambda: c.flushes == 2)
    assert c.flushes == 2


def test_held_events_are_sent_at_shutdown(hub, flush_ms):
    flush_ms(100)
    c = Coalescing(hub)
    c.on_send_event_buffered()
    c.shutdown()
    assert c.flushes == 1 and c.shut_down
    c.shutdown()  # nothing held: no extra flush
    assert c.flushes == 1


def test_zero_flush_interval_keeps_celerys_next_pass_flush(hub, flush_ms):
    flush_ms(0)
    c = Coalescing(hub)
    c.on_send_event_buffered()
    assert c.next_pass == 1 and c._events_flush_timer is None


class FakeChannel:
    def __init__(self, tables: list[list[tuple[str, str, str]]]) -> None:
        self.tables = tables
        self.calls = 0

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        self.calls += 1
        return self.tables[min(self.calls, len(self.tables)) - 1]


def test_reply_waits_until_the_clients_reply_queue_is_bound():
    bound = ("oid-1", "", "oid-1.reply.celery.pidbox")
    chan = FakeChannel([[], [], [bound]])
    assert events_consumer._wait_for_binding(chan, "reply.celery.pidbox", "oid-1")
    assert chan.calls == 3


def test_reply_to_a_client_that_is_gone_waits_only_a_moment(monkeypatch):
    monkeypatch.setattr(events_consumer, "REPLY_BIND_WAIT_S", 0.05)
    chan = FakeChannel([[("someone-else", "", "q")]])
    assert not events_consumer._wait_for_binding(chan, "reply.celery.pidbox", "oid-1")


def test_redact_hides_only_the_password():
    assert events_consumer._redact("redis://:s3cret@h:6379/1") == "redis://:**@h:6379/1"
    assert events_consumer._redact("redis://h:6379/1") == "redis://h:6379/1"


# -- logs ------------------------------------------------------------------------------------
def record(msg: str = "x", args=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("celery.worker.strategy", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_celerys_task_lines_are_stamped_with_the_task_id():
    rec = record("Task %(name)s[%(id)s] received", None, data={"id": "req-9", "name": "t"})
    logs.RequestIdFilter().filter(rec)
    assert rec.request_id == "req-9"


def test_our_context_wins_and_unrelated_lines_stay_unstamped():
    with logs.request_context("req-ctx"):
        rec = record(data={"id": "other"})
        logs.RequestIdFilter().filter(rec)
    assert rec.request_id == "req-ctx"
    plain = record("hello %s", ("world",))
    logs.RequestIdFilter().filter(plain)
    assert plain.request_id == "-"


def test_celerys_lines_inside_a_running_task_carry_its_id():
    from celery._state import _task_stack

    from nanogrid_celery.tasks import run_code

    run_code.push_request(id="req-in-task")
    _task_stack.push(run_code)
    try:
        rec = record("Task raised unexpected: %s", ("boom",))
        logs.RequestIdFilter().filter(rec)
    finally:
        _task_stack.pop()
        run_code.pop_request()
    assert rec.request_id == "req-in-task"
