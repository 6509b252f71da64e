"""Issue 11 classes 6-8 at the parsing layer, against moto's in-process S3.

6: input valid name by name that cannot be staged is rejected, with a message;
7: reading is bounded while it happens (a prefix whose objects grow between LIST
   and GET, a lying single object), counted at botocore's StreamingBody;
8: only configured buckets/prefixes may be named, checked before any S3 call.
"""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody

from nanogrid_celery.config import Limits, Settings
from nanogrid_celery.errors import RunRejected
from nanogrid_celery.execution import storage
from tests.hostile_inputs import PREFIX_CASES, ZIP_CASES, zipped

MiB = 1 << 20


# -- class 6: cannot be staged -> rejected -------------------------------------------
@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_unstageable_zip_is_rejected(s3, case):
    build, word = ZIP_CASES[case]
    storage.upload(s3, f"z/{case}.zip", build())
    with pytest.raises(RunRejected, match=word):
        storage.fetch_submission(s3, "python", "code", f"z/{case}.zip")


@pytest.mark.parametrize("case", sorted(PREFIX_CASES))
def test_unstageable_prefix_is_rejected(s3, case):
    keys, word = PREFIX_CASES[case]
    for i, rel in enumerate(keys):
        storage.upload(s3, f"p/{case}/{rel}", f"print({i})".encode())
    with pytest.raises(RunRejected, match=word):
        storage.fetch_submission(s3, "python", "code", f"p/{case}/")


def test_long_single_object_name_still_stages_as_main(s3):
    key = "s/" + "n" * 300 + ".py"
    storage.upload(s3, key, b"print(1)")
    assert storage.fetch_submission(s3, "python", "code", key) == {"main.py": b"print(1)"}


def _stage(files: dict[str, bytes], root: Path) -> None:
    """What sandbox/staging.write_files does, into a scratch directory."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_fuzzed_zips_are_rejected_or_stage(s3):
    """Random names and random byte flips: every outcome is a rejection or a tree that stages."""
    rng = random.Random(11)
    alphabet = ["a", "b", "a/", "/", ".", "..", "\x00", "\u00e9", "x" * 130, " ", "\n", ":", "\\"]
    outcomes = {"rejected": 0, "staged": 0}
    for i in range(300):
        names = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(3)]
        try:
            data = bytearray(zipped([("main.py", b"print(1)\n" * 20)] + [(n, b"y") for n in names]))
        except (ValueError, UnicodeError, IndexError):
            continue
        for _ in range(rng.choice([0, 0, 1, 3])):
            data[rng.randrange(len(data))] = rng.randrange(256)
        key = f"fz/{i}.zip"
        storage.upload(s3, key, bytes(data))
        try:
            files = storage.fetch_submission(s3, "python", "code", key)
        except RunRejected:
            outcomes["rejected"] += 1
            continue
        with tempfile.TemporaryDirectory() as tmp:
            _stage(files, Path(tmp))  # must never raise: staging cannot fail on their input
        outcomes["staged"] += 1
    assert outcomes["rejected"] and outcomes["staged"], outcomes


# -- class 7: bounded reads ------------------------------------------------------------
@pytest.fixture
def bytes_read(monkeypatch):
    """Every byte botocore hands us from an S3 body, summed."""
    seen = {"n": 0}
    original = StreamingBody.read

    def counting(self, amt=None):
        chunk = original(self, amt)
        seen["n"] += len(chunk)
        return chunk

    monkeypatch.setattr(StreamingBody, "read", counting)
    return seen


def _grow_after_listing(settings: Settings, prefix: str, size: int) -> None:
    """Once LIST answered, every object under the prefix is replaced by a ``size`` one."""
    client = storage.s3_client(settings)
    raw = boto3.client("s3", region_name="us-east-1")
    done = []

    def grow(**_kwargs):
        if done:
            return
        done.append(True)
        for item in raw.list_objects_v2(Bucket="code", Prefix=prefix)["Contents"]:
            raw.put_object(Bucket="code", Key=item["Key"], Body=b"#" * size)

    client.meta.events.register("after-call.s3.ListObjectsV2", grow)


def test_prefix_growing_between_list_and_get_is_bounded(s3, bytes_read):
    limits = Limits(max_code_bytes=1 * MiB, max_unpacked_bytes=4 * MiB, max_files=100)
    settings = Settings(s3_endpoint_url="", s3_bucket="code", limits=limits)
    for i in range(20):
        storage.upload(settings, f"grow/f{i}.py", b"x = 1\n")
    _grow_after_listing(settings, "grow/", 10 * MiB)  # 20 x 10 MiB = 200 MiB if read whole
    with pytest.raises(RunRejected, match="at most"):
        storage.fetch_submission(settings, "python", "code", "grow/")
    assert bytes_read["n"] <= limits.max_code_bytes + storage.READ_CHUNK, bytes_read


def test_single_object_read_stops_at_the_limit(s3, bytes_read, monkeypatch):
    """Even when the GET's Content-Length lies (a proxy, a racing writer)."""
    limits = Limits(max_code_bytes=1 * MiB)
    settings = Settings(s3_endpoint_url="", s3_bucket="code", limits=limits)
    storage.upload(settings, "big/solution.py", b"#" * (8 * MiB))
    client = storage.s3_client(settings)

    def lie(parsed, **_kwargs):
        parsed["ContentLength"] = 10

    client.meta.events.register("after-call.s3.GetObject", lie)
    with pytest.raises(RunRejected, match="at most"):
        storage.fetch_submission(settings, "python", "code", "big/solution.py")
    assert bytes_read["n"] <= limits.max_code_bytes + storage.READ_CHUNK, bytes_read


def test_zip_unpacking_is_bounded_even_when_sizes_lie():
    payload = zipped([("main.py", b"\0" * (8 * MiB))])
    limits = Limits(max_unpacked_bytes=1 * MiB)
    data = bytearray(payload)
    zf = zipfile.ZipFile(__import__("io").BytesIO(payload))
    info = zf.infolist()[0]
    cd = payload.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (100).to_bytes(4, "little")  # central directory: 100 bytes
    data[info.header_offset + 22 : info.header_offset + 26] = (100).to_bytes(4, "little")
    with pytest.raises(RunRejected):
        storage.unpack_zip(bytes(data), limits)


# -- class 8: who may name what --------------------------------------------------------
def test_foreign_bucket_is_rejected_before_any_s3_call(s3, monkeypatch):
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="secrets")
    storage.upload(s3, "creds.txt", b"AKIA...", bucket="secrets")
    calls = []
    client = storage.s3_client(s3)
    client.meta.events.register("before-call.s3", lambda **kw: calls.append(kw["model"].name))
    with pytest.raises(RunRejected, match="not an allowed code location"):
        storage.fetch_submission(s3, "cpp", "secrets", "creds.txt")
    assert calls == []


def test_allowed_locations_by_bucket_and_prefix(s3, monkeypatch):
    raw = boto3.client("s3", region_name="us-east-1")
    raw.create_bucket(Bucket="shared")
    for key in ("tenant-a/main.py", "tenant-b/main.py", "tenant-ab/main.py"):
        raw.put_object(Bucket="shared", Key=key, Body=b"print(1)")
    monkeypatch.setenv("NANOGRID_ALLOWED_CODE_LOCATIONS", "code, shared/tenant-a")
    monkeypatch.setenv("NANOGRID_S3_ENDPOINT_URL", "")
    settings = Settings.from_env()
    assert storage.fetch_submission(settings, "python", "shared", "tenant-a/main.py")
    assert storage.fetch_submission(settings, "python", "shared", "tenant-a/")
    for key in ("tenant-b/main.py", "tenant-ab/main.py", "tenant-a", "main.py", "/tenant-a/x"):
        with pytest.raises(RunRejected, match="not an allowed code location"):
            storage.fetch_submission(settings, "python", "shared", key)
    storage.upload(settings, "anything.py", b"print(2)", bucket="code")
    assert storage.fetch_submission(settings, "python", "code", "anything.py")


def test_default_is_the_code_bucket_only():
    from nanogrid_celery.execution.locations import allowed_locations, check_location

    settings = Settings(s3_bucket="nanogrid-code")
    assert allowed_locations(settings) == (("nanogrid-code", ""),)
    check_location(settings, "nanogrid-code", "code/sha256-x/code.zip")
    with pytest.raises(RunRejected):
        check_location(settings, "other", "x")
    assert os.environ.get("NANOGRID_ALLOWED_CODE_LOCATIONS") is None
    for key in ("code/../other/x.py", "../x", "code/./x", ".."):
        with pytest.raises(RunRejected, match="segments"):
            check_location(settings, "nanogrid-code", key)
