"""S3 layout handling against moto's in-process mock (no server needed)."""

import io
import stat
import zipfile

import pytest

from nanogrid_celery.config import Limits, Settings
from nanogrid_celery.errors import InternalError, RunRejected
from nanogrid_celery.execution import storage


def zipped(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def test_single_file_becomes_main(s3):
    storage.upload(s3, "a/solution.py", b"print(1)")
    assert storage.fetch_submission(s3, "python", "code", "a/solution.py") == {
        "main.py": b"print(1)"
    }


def test_zip_object_with_single_root_folder_is_flattened(s3):
    storage.upload(s3, "b/code.zip", zipped([("proj/main.py", b"x"), ("proj/lib/u.py", b"y")]))
    files = storage.fetch_submission(s3, "python", "code", "b/code.zip")
    assert files == {"main.py": b"x", "lib/u.py": b"y"}


def test_prefix_layout(s3):
    storage.upload(s3, "c/main.cpp", b"int main(){}")
    storage.upload(s3, "c/inc/a.h", b"#pragma once")
    files = storage.fetch_submission(s3, "cpp", "code", "c/")
    assert files == {"main.cpp": b"int main(){}", "inc/a.h": b"#pragma once"}


@pytest.mark.parametrize("key", ["missing.py", "nothing/"])
def test_missing_code_is_rejected(s3, key):
    with pytest.raises(RunRejected, match="no code"):
        storage.fetch_submission(s3, "python", "code", key)


def test_missing_bucket_is_rejected(s3):
    with pytest.raises(RunRejected):
        storage.fetch_submission(s3, "python", "no-such-bucket", "x.py")


def test_empty_and_oversized(s3):
    storage.upload(s3, "e.py", b"")
    with pytest.raises(RunRejected, match="empty"):
        storage.fetch_submission(s3, "python", "code", "e.py")
    small = Settings(s3_endpoint_url="", s3_bucket="code", limits=Limits(max_code_bytes=10))
    storage.upload(small, "big.py", b"x" * 11, bucket="code")
    with pytest.raises(RunRejected, match="at most 10"):
        storage.fetch_submission(small, "python", "code", "big.py")


@pytest.mark.parametrize("name", ["/abs.py", "../up.py", "a/../../up.py", "a\\b.py", "C:/x.py", ""])
def test_unsafe_names(name):
    with pytest.raises(RunRejected, match="unsafe"):
        storage.safe_name(name)


def test_zip_with_symlink_bomb_and_too_many_files():
    limits = Limits(max_unpacked_bytes=1000, max_files=3)
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(RunRejected, match="symbolic link"):
        storage.unpack_zip(zipped([("main.py", b"x"), (link, b"/etc/passwd")]), limits)
    with pytest.raises(RunRejected, match="zip bomb"):
        storage.unpack_zip(zipped([("main.py", b"\0" * 5000)]), limits)
    with pytest.raises(RunRejected, match="at most 3"):
        storage.unpack_zip(zipped([(f"f{i}", b"x") for i in range(4)]), limits)
    with pytest.raises(RunRejected, match="not a valid zip"):
        storage.unpack_zip(b"PK\x03\x04garbage", limits)


def test_s3_down_is_internal_error(monkeypatch):
    storage._clients.clear()
    settings = Settings(s3_endpoint_url="http://127.0.0.1:9", s3_bucket="code")
    with pytest.raises(InternalError, match="S3 unavailable"):
        storage.fetch_submission(settings, "python", "code", "x.py")
    storage._clients.clear()


def test_content_hash_is_stable_and_order_free():
    a = storage.content_hash({"main.py": b"1", "b.py": b"2"})
    assert a == storage.content_hash({"b.py": b"2", "main.py": b"1"})
    assert a != storage.content_hash({"main.py": b"1", "b.py": b"3"})
