"""S3 in and out: fetch a submission as a safe ``{relative path: bytes}`` map.

A submission is one of three S3 layouts: a ``.zip`` object, a single source
file, or a key prefix ending in ``/``. Everything hostile (absolute paths,
``..``, links, zip bombs, too many or too large files) is refused here, before
a single byte touches a container, as :class:`RunRejected`; S3 being down is
:class:`~nanogrid_celery.errors.StorageUnavailable` (an InternalError) so the
runner can retry.

Issue 11 hardening: a task may only name allowed locations (``locations.py``,
checked before any S3 call); every name of every layout goes through
``tree.check_tree`` so staging cannot fail on their input; corrupt compressed data
is their fault; and bytes are bounded *while* reading - each body is read in
``READ_CHUNK`` pieces against a running budget shared by the whole submission, so
no request makes the worker hold more than its limit plus one chunk. Measured with
moto (bytes returned by botocore's StreamingBody): a 20-object prefix whose objects
grow to 10 MiB between LIST and GET, default 10 MiB limit: 200.0 MiB read before
rejecting, now 10.0 MiB; limit 1 MiB: 20.0 MiB before, now 0 (each GET's
Content-Length is checked against the remaining budget before its body is read).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import re
import stat
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.common.perprocess import PerProcess
from nanogrid_celery.config import Limits, Settings
from nanogrid_celery.errors import RunRejected, StorageUnavailable
from nanogrid_celery.execution.locations import check_location
from nanogrid_celery.execution.runtimes import main_file_name
from nanogrid_celery.execution.tree import check_tree

log = get_logger(__name__)

Files = dict[str, bytes]
_clients: PerProcess[tuple, Any] = PerProcess(lambda key: _client(key))  # ~50 ms to build
_MISSING = {"NoSuchKey", "404", "NoSuchBucket", "NotFound"}
READ_CHUNK = 64 * 1024  # bytes per body read: the most a read can overshoot its budget
# what a decoder raises on corrupt data inside a zip: all their fault
_ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # unsupported method, strong encryption, patched data
    RuntimeError,  # encrypted entry without a password
    ValueError,  # UnicodeDecodeError of a header name among them
    EOFError,
    OSError,  # bz2
    struct.error,
)


def _client(key: tuple) -> Any:
    endpoint, region, max_attempts, creds = key
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        **dict(creds),
        config=Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=3,
            read_timeout=20,
        ),
    )


def s3_client(settings: Settings, max_attempts: int = 3):
    """A cached boto3 client: creating one costs ~50 ms, far more than a small GET."""
    creds = tuple(sorted(settings.s3_credentials().items()))
    return _clients.get((settings.s3_endpoint, settings.s3_region, max_attempts, creds))


def safe_name(name: str) -> str:
    """Normalise a relative path or reject it (absolute, ``..``, backslashes, empty)."""
    if "\x00" in name:
        raise RunRejected(f"a NUL byte in a file name is not allowed: {name!r}")
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name:
        raise RunRejected(f"unsafe path in submission: {name!r}")
    parts = PurePosixPath(name).parts
    if any(p == ".." for p in parts) or (parts and ":" in parts[0]):
        raise RunRejected(f"unsafe path in submission: {name!r}")
    clean = "/".join(p for p in parts if p not in ("", "."))
    if not clean:
        raise RunRejected(f"unsafe path in submission: {name!r}")
    return clean


def unpack_zip(data: bytes, limits: Limits) -> Files:
    """Extract a zip in memory, bounded by the unpacked-size and file-count limits."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except _ZIP_READ_ERRORS as exc:
        raise RunRejected(f"submission is not a valid zip archive: {exc}") from exc
    for info in infos:  # zipfile cuts a name at its first NUL; the original keeps it
        if "\x00" in info.orig_filename:
            raise RunRejected(f"a NUL byte in a file name is not allowed: {info.orig_filename!r}")
    entries = [i for i in infos if not i.is_dir()]
    if len(entries) > limits.max_files:
        raise RunRejected(f"zip has {len(entries)} files; at most {limits.max_files} allowed")
    declared = sum(i.file_size for i in entries)
    if declared > limits.max_unpacked_bytes:
        raise RunRejected(
            f"zip unpacks to {declared} bytes; at most {limits.max_unpacked_bytes} allowed "
            "(zip bomb?)"
        )
    names: list[tuple[str, zipfile.ZipInfo]] = []
    for info in entries:
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise RunRejected(f"zip contains a symbolic link: {info.filename!r}")
        if mode and not (stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0):
            raise RunRejected(f"zip contains a special file: {info.filename!r}")
        names.append((safe_name(info.filename), info))
    dirs = [safe_name(i.filename) for i in infos if i.is_dir() and i.filename.strip("/.")]
    check_tree((n for n, _ in names), dirs)  # every name, before a byte is decompressed
    files: Files = {}
    budget = limits.max_unpacked_bytes
    for name, info in names:
        try:
            with archive.open(info) as fh:
                content = _read_bounded(fh, budget)
        except _ZIP_READ_ERRORS as exc:
            raise RunRejected(f"cannot read {info.filename!r} from zip: {exc}") from exc
        budget -= len(content)
        if budget < 0:
            raise RunRejected("zip unpacks past its declared size (zip bomb?)")
        files[name] = content
    return _strip_single_root(files)


def _read_bounded(stream: Any, budget: int) -> bytes:
    """Read ``stream`` until EOF or just past ``budget`` bytes, in ``READ_CHUNK`` pieces.

    A caller that sees more than ``budget`` bytes back rejects; nothing past
    ``budget + READ_CHUNK`` is ever held, whatever a length header claimed.
    """
    chunks: list[bytes] = []
    held = 0
    while held <= budget:
        chunk = stream.read(min(READ_CHUNK, budget + 1 - held))
        if not chunk:
            break
        chunks.append(chunk)
        held += len(chunk)
    return b"".join(chunks)


def _strip_single_root(files: Files) -> Files:
    """``proj/main.py`` -> ``main.py`` when everything sits in one top folder."""
    tops = {n.split("/", 1)[0] for n in files}
    if len(tops) == 1 and all("/" in n for n in files):
        return {n.split("/", 1)[1]: c for n, c in files.items()}
    return files


def _check_total(files: Mapping[str, bytes], limits: Limits) -> None:
    if not files:
        raise RunRejected("submission is empty")
    total = sum(len(c) for c in files.values())
    if total == 0:
        raise RunRejected("submission is empty (every file has zero bytes)")
    if total > limits.max_unpacked_bytes:
        raise RunRejected(f"submission is {total} bytes; at most {limits.max_unpacked_bytes}")
    check_tree(files)  # every layout, after the single-root strip: what staging will write


def fetch_submission(settings: Settings, runtime: str, bucket: str, key: str) -> Files:
    """Download and validate the code at ``s3://bucket/key`` for ``runtime``."""
    if not bucket or not key:
        raise RunRejected("s3_bucket and s3_key are required")
    check_location(settings, bucket, key)  # the trust boundary: before any S3 call
    limits = settings.limits
    client = s3_client(settings)
    try:
        if key.endswith("/"):
            files = _fetch_prefix(client, bucket, key, limits)
        else:
            files = _fetch_object_cached(settings, client, bucket, key, runtime)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise RunRejected(f"no code at s3://{bucket}/{key} ({code})") from exc
        if code in {"AccessDenied", "403"}:
            raise RunRejected(f"access denied to s3://{bucket}/{key}") from exc
        raise StorageUnavailable(f"S3 error reading s3://{bucket}/{key}: {code} {exc}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"S3 unavailable reading s3://{bucket}/{key}: {exc}") from exc
    _check_total(files, limits)
    return files


class SubmissionCache:
    """Validated submissions by (bucket, key, runtime, limits), LRU-bounded in entries and bytes.

    An entry is revalidated with a conditional GET (``IfNoneMatch`` on its ETag:
    a 304 carries no body and skips the unzip and checks). Keys that name their
    content (a ``sha256-<hex>`` path segment, verified against the bytes on the
    first fetch) are immutable and served without any S3 call at all.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, tuple[str, int, Files]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> tuple[str, Files] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0], entry[2]

    def put(self, key: tuple, etag: str, files: Files, max_entries: int, max_bytes: int) -> None:
        size = sum(len(c) for c in files.values())
        if max_entries <= 0 or size > max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (etag, size, files)
            self._bytes += size
            while len(self._entries) > max_entries or self._bytes > max_bytes:
                _, (_, dropped, _) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


CACHE = SubmissionCache()
_CONTENT_ADDRESSED = re.compile(r"(?:^|/)sha256-([0-9a-f]{64})(?:[/.]|$)")


def _fetch_object_cached(settings: Settings, client, bucket: str, key: str, runtime: str) -> Files:
    limits = settings.limits
    if settings.s3_cache_entries <= 0:
        return _fetch_object(client, bucket, key, runtime, limits)
    ck = (bucket, key, runtime, limits)
    named = _CONTENT_ADDRESSED.search(key)
    cached = CACHE.get(ck)
    if cached is not None and named:
        CACHE.hits += 1
        return dict(cached[1])
    try:
        obj = client.get_object(
            Bucket=bucket, Key=key, **({"IfNoneMatch": cached[0]} if cached else {})
        )
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if cached is not None and (status == 304 or code in {"304", "NotModified"}):
            CACHE.hits += 1
            return dict(cached[1])
        raise
    CACHE.misses += 1
    data, files = _read_object(obj, bucket, key, runtime, limits)
    if named and hashlib.sha256(data).hexdigest() != named.group(1):
        raise RunRejected(f"s3://{bucket}/{key} does not match the sha256 in its name")
    etag = str(obj.get("ETag") or "")
    if etag or named:
        mb = settings.s3_cache_mb * 1024 * 1024
        CACHE.put(ck, etag, files, settings.s3_cache_entries, mb)
    return dict(files)


def _fetch_object(client, bucket: str, key: str, runtime: str, limits: Limits) -> Files:
    obj = client.get_object(Bucket=bucket, Key=key)
    return _read_object(obj, bucket, key, runtime, limits)[1]


def _read_object(obj: dict, bucket: str, key: str, runtime: str, limits: Limits) -> tuple:
    """(raw bytes, files) of a GET response, with every size check."""
    size = int(obj.get("ContentLength") or 0)
    if size > limits.max_code_bytes:
        obj["Body"].close()
        raise RunRejected(f"code object is {size} bytes; at most {limits.max_code_bytes} allowed")
    try:
        data = _read_bounded(obj["Body"], limits.max_code_bytes)
    finally:
        obj["Body"].close()
    if len(data) > limits.max_code_bytes:
        raise RunRejected(
            f"code object is over {limits.max_code_bytes} bytes; at most {limits.max_code_bytes}"
        )
    if not data:
        raise RunRejected(f"code object s3://{bucket}/{key} is empty")
    if key.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
        return data, unpack_zip(data, limits)
    return data, {main_file_name(runtime, key.rsplit("/", 1)[-1]): data}


def _fetch_prefix(client, bucket: str, prefix: str, limits: Limits) -> Files:
    keys: list[tuple[str, int]] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                keys.append((item["Key"], int(item.get("Size", 0))))
            if len(keys) > limits.max_files:
                raise RunRejected(f"prefix holds more than {limits.max_files} files")
    if not keys:
        raise RunRejected(f"no code under s3://{bucket}/{prefix}")
    total = sum(size for _, size in keys)
    if total > limits.max_code_bytes:
        raise RunRejected(f"code under prefix is {total} bytes; at most {limits.max_code_bytes}")
    names = [safe_name(full_key[len(prefix) :]) for full_key, _ in keys]
    check_tree(names)  # before any GET
    files: Files = {}
    budget = limits.max_code_bytes  # shared by every object: LIST sizes may be stale
    for (full_key, _), name in zip(keys, names, strict=True):
        obj = client.get_object(Bucket=bucket, Key=full_key)
        if int(obj.get("ContentLength") or 0) > budget:
            obj["Body"].close()
            raise RunRejected(f"code under prefix grew past at most {limits.max_code_bytes} bytes")
        try:
            content = _read_bounded(obj["Body"], budget)
        finally:
            obj["Body"].close()
        budget -= len(content)
        if budget < 0:
            raise RunRejected(f"code under prefix is over at most {limits.max_code_bytes} bytes")
        files[name] = content
    return files


def content_hash(files: Mapping[str, bytes]) -> str:
    """A stable identity for a submission (the tuner's default function key)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\x00" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()[:16]


def ensure_bucket(settings: Settings, bucket: str | None = None) -> str:
    """Create the bucket if it is missing (local stack convenience; a no-op on real AWS)."""
    name = bucket or settings.s3_bucket
    client = s3_client(settings)
    try:
        client.head_bucket(Bucket=name)
    except ClientError:
        kwargs = {}
        if settings.s3_region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.s3_region}
        client.create_bucket(Bucket=name, **kwargs)
    return name


def upload(settings: Settings, key: str, data: bytes, bucket: str | None = None) -> str:
    name = bucket or settings.s3_bucket
    s3_client(settings).put_object(Bucket=name, Key=key, Body=data)
    return name


def content_addressed_key(data: bytes, name: str, prefix: str = "code") -> str:
    """``<prefix>/sha256-<hex>/<name>``: a key that names its bytes, cached without revalidation."""
    return f"{prefix}/sha256-{hashlib.sha256(data).hexdigest()}/{name}"
