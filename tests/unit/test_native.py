"""Issue 13 units: the one app routes control/events to the events Redis, tasks to SQS."""

from __future__ import annotations

import os
import subprocess
import sys

from kombu import Connection

from nanogrid_celery.app import app
from nanogrid_celery.monitoring import native
from nanogrid_celery.monitoring.run_state import (
    RunStateRequest,
    failed_event_fields,
    status_from_repr,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tasks_go_to_sqs_and_monitoring_to_the_events_redis():
    assert "sqs_transport" in app.connection_for_write().as_uri()  # tasks: SQS
    assert app.connection().as_uri().startswith("redis://")  # Flower's capture: the events Redis
    assert app.pool.connection.as_uri() == app.connection_for_write().as_uri()
    assert "nanogrid.run_code" in app.tasks  # registered on import: Flower can apply it


def test_broadcast_uses_a_fresh_events_connection(monkeypatch):
    made: list[Connection] = []
    seen: list[object] = []

    def fake_connection(url: str) -> Connection:
        conn = Connection("memory://")
        made.append(conn)
        return conn

    monkeypatch.setattr(native, "monitoring_connection", fake_connection)

    def stock_broadcast(self, cmd, *a, connection=None, **k):
        seen.append(connection)

    monkeypatch.setattr(native.Control, "broadcast", stock_broadcast)
    app.control.broadcast("ping")
    app.control.broadcast("ping")
    assert len(made) == 2 and seen == made  # one connection per call, never the SQS pool
    assert app.control.mailbox.producer_pool is None


def test_receiver_swaps_an_sqs_connection_for_the_events_redis(monkeypatch):
    monkeypatch.setattr(native, "monitoring_connection", lambda url: Connection("memory://"))
    recv = app.events.Receiver(app.connection_for_read(), handlers={})
    assert recv.connection.transport_cls == "memory"
    routable = Connection("memory://")  # has a topic exchange, as Redis does: kept
    assert app.events.Receiver(routable, handlers={}).connection is routable


def test_status_from_repr_and_failed_fields():
    text = "{'request_id': 'r1', 'runtime': 'python', 'status': 'timeout', 'stdout': ''}"
    assert status_from_repr(text) == "timeout"
    assert status_from_repr("{'a': 1}") is None and status_from_repr(None) is None
    fields = failed_event_fields("oom", {"result": text, "runtime": 0.1})
    assert fields["exception"] == "RunFailed('oom')" and fields["run_status"] == "oom"
    assert fields["result"] == text and fields["traceback"] == ""


def test_run_state_request_turns_a_failed_run_into_task_failed():
    sent: list[tuple[str, dict]] = []

    class Probe(RunStateRequest):
        def __init__(self) -> None:  # no message needed to test the event mapping
            pass

    def record(self, type, **fields):
        sent.append((type, fields))

    Probe.__bases__[0].__bases__[0].send_event = record  # Celery's Request.send_event
    try:
        Probe().send_event("task-succeeded", result="{'status': 'error'}", runtime=1.0)
        Probe().send_event("task-succeeded", result="{'status': 'success'}", runtime=1.0)
        Probe().send_event("task-started")
    finally:
        del Probe.__bases__[0].__bases__[0].send_event
    assert [t for t, _ in sent] == ["task-failed", "task-succeeded", "task-started"]
    assert sent[0][1]["run_status"] == "error" and sent[1][1]["run_status"] == "success"


def test_the_old_app_name_takes_its_broker_as_the_events_broker():
    code = (
        "from nanogrid_celery.monitoring.app import app; from nanogrid_celery import app as a;"
        "assert app is a; print(app.connection().as_uri(), app.connection_for_write().as_uri())"
    )
    env = {**os.environ, "CELERY_BROKER_URL": "redis://127.0.0.1:6399/7"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0].endswith("127.0.0.1:6399/7") and "5000" in out[1]


def test_without_an_events_broker_everything_is_stock_celery(monkeypatch):
    from nanogrid_celery.config import get_settings

    monkeypatch.setenv("NANOGRID_EVENTS_BROKER_URL", "")
    get_settings.cache_clear()
    try:
        assert app.connection().as_uri() == app.connection_for_write().as_uri()
        sqs = app.connection_for_read()
        assert app.events.Receiver(sqs, handlers={}).connection is sqs
    finally:
        get_settings.cache_clear()
