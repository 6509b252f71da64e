"""Issue #7: the claim store against the real Redis (no worker needed)."""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import replace

import pytest

from nanogrid_celery.config import get_settings
from nanogrid_celery.delivery.idempotency import CLAIM, ClaimStore, owner_id

pytestmark = pytest.mark.integration


@pytest.fixture
def store() -> ClaimStore:
    return ClaimStore(replace(get_settings(), claim_ttl_s=1))


def rid() -> str:
    return f"req-idem-{uuid.uuid4().hex}"


def test_claim_busy_then_done_with_the_stored_result(store):
    request_id = rid()
    first = store.acquire(request_id)
    assert first.action == "run" and first.claim.starts == 1
    assert store.acquire(request_id).action == "busy", "a live owner is never run over"
    first.claim.finish({"request_id": request_id, "stdout": "once"})
    again = store.acquire(request_id)
    assert again.action == "done" and again.result["stdout"] == "once"
    assert store.starts(request_id) == 1


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(store):
    request_id = rid()
    dead = subprocess.Popen(["true"])
    dead.wait()
    host, _, pstart, nonce = owner_id().split("|")
    store.redis.set(CLAIM.format(request_id), f"{host}|{dead.pid}|{pstart}|{nonce}", px=60_000)
    verdict = store.acquire(request_id)
    assert verdict.action == "run"
    assert store.redis.get(CLAIM.format(request_id)).decode() == verdict.claim.owner


def test_claim_of_another_host_waits_for_its_ttl(store):
    request_id = rid()
    store.redis.set(CLAIM.format(request_id), "elsewhere|1|1|x", px=1000)
    assert store.acquire(request_id).action == "busy"
    time.sleep(1.2)
    assert store.acquire(request_id).action == "run", "an expired claim frees the request"


def test_a_kept_alive_claim_outlives_its_ttl_and_abandon_frees_it(store):
    request_id = rid()
    claim = store.acquire(request_id).claim
    with claim.kept_alive():
        time.sleep(2.0)  # twice the TTL
        assert store.acquire(request_id).action == "busy"
    claim.abandon()
    assert store.acquire(request_id).action == "run"
    assert store.starts(request_id) == 2
