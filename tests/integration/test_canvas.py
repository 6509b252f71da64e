"""Issue 13: Celery canvas over runs, on SQS + the Redis result backend.

``group`` (and ``client.map``: one upload per distinct code), ``chord`` with
``nanogrid.summarize``, ``link``, and a chain through ``nanogrid.check`` whose
``link_error`` (a user's errback, loaded with ``--include``) fires on a failed run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import chord

from nanogrid_celery import client
from nanogrid_celery.app import app
from nanogrid_celery.canvas import RunFailed, check, summarize
from nanogrid_celery.common.redis import get_redis
from nanogrid_celery.config import get_settings

from .canvas_tasks import ERRBACK_KEY, record_failure
from .harness import WorkerProcess
from .test_flower import wait_for

pytestmark = pytest.mark.integration

ECHO = {"main.py": "import sys\nprint(int(sys.stdin.read()) * 2)\n"}
FAIL = {"main.py": "import sys\nsys.exit(7)\n"}


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    w = WorkerProcess(
        "canvas", concurrency=2, pool_python=1, pool_cpp=0, include="tests.integration.canvas_tasks"
    ).start()
    yield w
    w.stop()
    for c in w.containers():
        c.remove(force=True)


def unique(code: dict[str, str]) -> dict[str, str]:
    """The same program with a new content hash, so this process uploads it afresh."""
    return {**code, "salt.txt": uuid.uuid4().hex}


@pytest.fixture
def uploads(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = client.upload

    def counting(settings, key, data, bucket=None):
        seen.append(key)
        return real(settings, key, data, bucket)

    monkeypatch.setattr(client, "upload", counting)
    return seen


def test_map_runs_a_group_of_five_with_one_upload(worker, uploads):
    handle = client.map(unique(ECHO), stdins=[str(i) for i in range(5)], queue=worker.queue)
    results = handle.get(timeout=120)
    assert [r["stdout"] for r in results] == [f"{i * 2}\n" for i in range(5)]
    assert [r["status"] for r in results] == ["success"] * 5
    assert len(uploads) == 1
    assert [c.run_status for c in handle.results] == ["success"] * 5
    assert [r["request_id"] for r in results] == [c.id for c in handle.results]


def test_map_over_several_codes_uploads_each_distinct_code_once(worker, uploads):
    a, b = unique(ECHO), unique(FAIL)
    handle = client.map([a, b, dict(a)], stdins=["1", "1", "2"], queue=worker.queue)
    results = handle.get(timeout=120)
    assert [r["status"] for r in results] == ["success", "error", "success"]
    assert len(uploads) == 2


def test_chord_callback_gets_every_result(worker):
    header = client.signatures(
        [ECHO, ECHO, FAIL, ECHO], stdins=["1", "2", "3", "4"], queue=worker.queue
    )
    summary = chord(header)(summarize.s().set(queue=worker.queue)).get(timeout=120)
    assert summary["total"] == 4
    assert summary["by_status"] == {"success": 3, "error": 1}
    assert summary["request_ids"] == [s.options["task_id"] for s in header]
    assert summary["not_ok"] == [header[2].options["task_id"]]


def test_link_calls_back_with_the_result(worker):
    callback_id = f"cb-{uuid.uuid4().hex}"
    sig = client.signature(ECHO, stdin="21", queue=worker.queue)
    run = sig.apply_async(link=summarize.s().set(queue=worker.queue, task_id=callback_id))
    assert run.get(timeout=90)["stdout"] == "42\n"
    linked = app.AsyncResult(callback_id).get(timeout=60)
    assert linked["total"] == 1 and linked["ok"] and linked["request_ids"] == [run.id]


def test_chain_through_check_continues_on_success(worker):
    flow = (
        client.signature(ECHO, stdin="5", queue=worker.queue)
        | check.s().set(queue=worker.queue)
        | summarize.s().set(queue=worker.queue)
    )
    assert flow.apply_async().get(timeout=90)["ok"] is True


def test_link_error_fires_when_check_sees_a_failed_run(worker):
    run = client.signature(FAIL, queue=worker.queue)
    flow = run | check.s().set(queue=worker.queue)
    handle = flow.apply_async(link_error=record_failure.s())
    with pytest.raises(RunFailed) as err:
        handle.get(timeout=90)
    assert "ended error" in str(err.value)
    assert app.AsyncResult(run.options["task_id"]).get(timeout=10)["status"] == "error"
    store = get_redis(get_settings().redis_url)
    recorded = wait_for(lambda: store.get(ERRBACK_KEY + handle.id), 30, "the errback")
    assert "RunFailed" in recorded
