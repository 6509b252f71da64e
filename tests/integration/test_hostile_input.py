"""Issue 11, classes 6 and 8, through a real worker: their input never touches a container.

Every submission here is valid name by name but cannot be staged (or names a location
the worker may not read). Each must end ``rejected`` with a message, and the worker's
containers must be exactly the ones it had before the batch: none created, none
destroyed. Before the fix several of these ended ``internal_error`` after discarding
two warm containers each, so one client could churn the pool.
"""

from __future__ import annotations

import uuid

import boto3
import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.execution.storage import ensure_bucket, upload
from nanogrid_celery.result import Status
from tests.hostile_inputs import PREFIX_CASES, ZIP_CASES

pytestmark = pytest.mark.integration


def _ids(worker) -> set[str]:
    return {c.id for c in worker.containers()}


def test_unstageable_batch_is_rejected_without_touching_a_container(worker):
    settings = get_settings()
    bucket = ensure_bucket(settings)
    warm = worker.run({"main.py": "print('warm')"})
    assert warm.status == Status.SUCCESS, warm
    assert worker.wait_pool_full()
    before = _ids(worker)
    tag = uuid.uuid4().hex[:8]
    sent: dict[str, tuple] = {}
    for case, (build, word) in ZIP_CASES.items():
        key = f"hostile/{tag}/{case}.zip"
        upload(settings, key, build(), bucket)
        sent[f"zip:{case}"] = (key, word)
    for case, (keys, word) in PREFIX_CASES.items():
        for i, rel in enumerate(keys):
            upload(settings, f"hostile/{tag}/p-{case}/{rel}", f"print({i})".encode(), bucket)
        sent[f"prefix:{case}"] = (f"hostile/{tag}/p-{case}/", word)
    other = f"foreign-{tag}"
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name="us-east-1",
        **settings.s3_credentials(),
    )
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=other, Key="secret.txt", Body=b"do not print me")
    handles = {
        name: client.enqueue(f"{tag}-{name}", "python", bucket, key, queue=worker.queue)
        for name, (key, _word) in sent.items()
    }
    handles["foreign-bucket"] = client.enqueue(
        f"{tag}-foreign", "cpp", other, "secret.txt", queue=worker.queue
    )
    sent["foreign-bucket"] = ("secret.txt", "not an allowed code location")
    wrong = {}
    for name, handle in handles.items():
        result = client.wait(handle, timeout=60)
        word = sent[name][1]
        leaked = "do not print me" in (result.stdout or "") + (result.message or "")
        if result.status != Status.REJECTED or word not in (result.message or "") or leaked:
            wrong[name] = (str(result.status), (result.message or "")[:100], result.container_id)
    assert worker.wait_pool_full()
    changed = {"created": _ids(worker) - before, "destroyed": before - _ids(worker)}
    assert wrong == {}, (wrong, changed)
    assert _ids(worker) == before, f"a rejected submission changed the containers: {changed}"
    after = worker.run({"main.py": "print('still fine')"})
    assert after.status == Status.SUCCESS and after.container_id == warm.container_id, after
