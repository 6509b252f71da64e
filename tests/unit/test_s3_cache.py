"""The worker's submission cache: ETag revalidation, content-addressed keys, bounds."""

from __future__ import annotations

import pytest

from nanogrid_celery.config import Settings
from nanogrid_celery.errors import RunRejected
from nanogrid_celery.execution import storage


def counts() -> tuple[int, int]:
    return storage.CACHE.hits, storage.CACHE.misses


def test_unchanged_object_is_revalidated_not_downloaded(s3):
    storage.upload(s3, "f/main.py", b"print(1)")
    h0, m0 = counts()
    assert storage.fetch_submission(s3, "python", "code", "f/main.py") == {"main.py": b"print(1)"}
    assert storage.fetch_submission(s3, "python", "code", "f/main.py") == {"main.py": b"print(1)"}
    assert counts() == (h0 + 1, m0 + 1)


def test_changed_object_is_downloaded_again(s3):
    storage.upload(s3, "f/main.py", b"print(1)")
    storage.fetch_submission(s3, "python", "code", "f/main.py")
    storage.upload(s3, "f/main.py", b"print(2)")
    assert storage.fetch_submission(s3, "python", "code", "f/main.py") == {"main.py": b"print(2)"}


def test_deleted_object_is_not_served_from_the_cache(s3):
    storage.upload(s3, "f/main.py", b"print(1)")
    storage.fetch_submission(s3, "python", "code", "f/main.py")
    storage.s3_client(s3).delete_object(Bucket="code", Key="f/main.py")
    with pytest.raises(RunRejected, match="no code"):
        storage.fetch_submission(s3, "python", "code", "f/main.py")


def test_content_addressed_key_is_served_without_s3(s3, monkeypatch):
    data = b"print('cas')"
    key = storage.content_addressed_key(data, "main.py")
    storage.upload(s3, key, data)
    assert storage.fetch_submission(s3, "python", "code", key) == {"main.py": data}

    def no_s3(*args, **kwargs):
        raise AssertionError("S3 was called for an immutable, cached key")

    monkeypatch.setattr(storage, "s3_client", lambda *a, **k: type("C", (), {"get_object": no_s3}))
    assert storage.fetch_submission(s3, "python", "code", key) == {"main.py": data}


def test_content_addressed_key_must_match_its_bytes(s3):
    key = storage.content_addressed_key(b"print('expected')", "main.py")
    storage.upload(s3, key, b"print('something else')")
    with pytest.raises(RunRejected, match="sha256"):
        storage.fetch_submission(s3, "python", "code", key)


def test_returned_files_are_a_copy(s3):
    storage.upload(s3, "f/main.py", b"print(1)")
    first = storage.fetch_submission(s3, "python", "code", "f/main.py")
    first["evil.py"] = b"x"
    assert storage.fetch_submission(s3, "python", "code", "f/main.py") == {"main.py": b"print(1)"}


def test_cache_is_bounded():
    cache = storage.SubmissionCache()
    for i in range(10):
        cache.put(("b", f"k{i}"), "etag", {"main.py": b"x" * 100}, max_entries=3, max_bytes=10_000)
    assert cache.get(("b", "k0")) is None and cache.get(("b", "k9")) is not None
    cache.put(("b", "big"), "etag", {"main.py": b"x" * 250}, max_entries=3, max_bytes=300)
    assert cache.get(("b", "big")) is not None
    assert cache.get(("b", "k9")) is None, "byte bound evicts the least recently used"


def test_cache_can_be_turned_off(s3):
    off = Settings(s3_endpoint_url="", s3_bucket="code", s3_cache_entries=0)
    storage.upload(off, "f/main.py", b"print(1)")
    before = counts()
    storage.fetch_submission(off, "python", "code", "f/main.py")
    storage.fetch_submission(off, "python", "code", "f/main.py")
    assert counts() == before
