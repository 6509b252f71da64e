"""Issue #7: the pure parts of delivery safety (no services)."""

from __future__ import annotations

import socket
import subprocess
from dataclasses import replace

import pytest

from nanogrid_celery.config import Limits, Settings
from nanogrid_celery.delivery.deadletter import dlq_name
from nanogrid_celery.delivery.idempotency import owner_alive, owner_id
from nanogrid_celery.delivery.sqs import broker_endpoint
from nanogrid_celery.delivery.visibility import (
    VisibilityTooShort,
    check_visibility_timeout,
    heartbeat_interval,
    longest_run_seconds,
)


def test_default_visibility_covers_the_longest_run():
    s = Settings()
    assert longest_run_seconds(s) == 120 + 60 + 60
    check_visibility_timeout(s)


def test_short_visibility_is_refused():
    s = replace(Settings(), visibility_timeout=200, limits=Limits(max_timeout_ms=150_000))
    with pytest.raises(VisibilityTooShort, match="shorter than the longest allowed run"):
        check_visibility_timeout(s)


def test_heartbeat_beats_four_times_per_timeout_but_not_faster_than_1s():
    assert heartbeat_interval(replace(Settings(), visibility_timeout=600)) == 150
    assert heartbeat_interval(replace(Settings(), visibility_timeout=2)) == 1


def test_broker_endpoint_follows_kombu():
    local = replace(Settings(), broker_url="sqs://AK%2F1:se%2Bcret@127.0.0.1:5000")
    assert broker_endpoint(local) == (
        "http://127.0.0.1:5000",
        {"aws_access_key_id": "AK/1", "aws_secret_access_key": "se+cret"},
    )
    assert broker_endpoint(replace(Settings(), broker_url="sqs://")) == (None, {})


def test_dlq_name():
    assert dlq_name(replace(Settings(), queue="runs")) == "runs-dlq"
    assert dlq_name(replace(Settings(), queue="runs", dead_letter_queue="parked")) == "parked"
    assert dlq_name(replace(Settings(), queue="runs.fifo")) == "runs-dlq.fifo"


def test_owner_alive():
    assert owner_alive(owner_id()), "this very process"
    proc = subprocess.Popen(["true"])
    proc.wait()
    host = socket.gethostname()
    assert not owner_alive(f"{host}|{proc.pid}|0|x"), "a dead pid on this host"
    assert owner_alive("some-other-host|1|1|x"), "unknowable: its TTL decides"
    assert not owner_alive("garbage")
