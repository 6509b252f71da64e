"""Inputs (stdin, test cases) inline in the message when small, through S3 when large.

SQS caps a message at 1 MiB (256 KiB on older queues; moto enforces 1 MiB) and
kombu base64-encodes the body, so a 2 MB stdin sent inline made ``client.run``
raise botocore's raw ``InvalidParameterValue``. Anything above
``NANOGRID_INPUT_INLINE_MAX_BYTES`` (128 KiB each for stdin and for the cases
document, so both inline stay far below the cap) is uploaded content-addressed
beside the code, ``inputs/sha256-<hex>/stdin`` or ``.../cases.json``, and the
task carries only the key. The worker reads it with a bounded GET (the
documented maximum + 1 byte, after a ``ContentLength`` check) and checks the
sha256 its name promises.

Maxima (``NANOGRID_MAX_STDIN_BYTES`` 8 MiB per stdin, ``NANOGRID_MAX_CASES``
100, ``NANOGRID_MAX_CASES_BYTES`` 64 MiB for the cases document) are checked
by the client before anything is uploaded or sent (:class:`RunRejected` with
a clear message) and again by the worker (``rejected``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from nanogrid_celery.config import Settings
from nanogrid_celery.errors import RunRejected, StorageUnavailable
from nanogrid_celery.execution.batch import validate_cases
from nanogrid_celery.execution.locations import check_location
from nanogrid_celery.execution.request import RunRequest, stdin_bytes
from nanogrid_celery.execution.storage import content_addressed_key, s3_client, upload

INPUT_PREFIX = "inputs"
_MISSING = {"NoSuchKey", "404", "NoSuchBucket", "NotFound"}


# -- client side ---------------------------------------------------------------------------
def encode_cases(cases: list[dict[str, Any]]) -> bytes:
    """Canonical JSON: the same cases give the same bytes, hence the same key."""
    return json.dumps(cases, sort_keys=True, separators=(",", ":")).encode()


def check_inputs(settings: Settings, stdin: str | None, cases: list[dict[str, Any]] | None) -> None:
    """Every maximum, before anything is uploaded or sent: RunRejected with the reason."""
    if stdin is not None and cases is not None:
        raise RunRejected("a batch takes its input from each case's stdin; give stdin or cases")
    if stdin is not None:
        stdin_bytes(settings, stdin)
    if cases is not None:
        validate_cases(settings, cases)
        size = len(encode_cases(cases))
        if size > settings.limits.max_cases_bytes:
            raise RunRejected(
                f"the cases are {size} bytes as JSON; at most {settings.limits.max_cases_bytes}"
            )


def prepare_inputs(
    settings: Settings, bucket: str, stdin: str | None, cases: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """Task kwargs for ``stdin`` and ``cases``: inline, or an S3 key; over a maximum: refused."""
    kwargs: dict[str, Any] = {}
    limit = settings.input_inline_max_bytes
    if stdin is not None:
        data = stdin_bytes(settings, stdin)  # raises RunRejected above the maximum
        assert data is not None
        if len(data) <= limit:
            kwargs["stdin"] = stdin
        else:
            key = content_addressed_key(data, "stdin", INPUT_PREFIX)
            upload(settings, key, data, bucket)
            kwargs["stdin_s3_key"] = key
    check_inputs(settings, None, cases)
    if cases is not None:
        data = encode_cases(cases)
        if len(data) <= limit:
            kwargs["cases"] = cases
        else:
            key = content_addressed_key(data, "cases.json", INPUT_PREFIX)
            upload(settings, key, data, bucket)
            kwargs["cases_s3_key"] = key
    return kwargs


# -- worker side ---------------------------------------------------------------------------
def fetch_input(settings: Settings, bucket: str, key: str, max_bytes: int) -> bytes:
    """The object's bytes, at most ``max_bytes``, matching the sha256 in its name."""
    if not key.startswith(INPUT_PREFIX + "/sha256-"):
        raise RunRejected(f"input key {key!r} is not under {INPUT_PREFIX}/sha256-<hex>/")
    check_location(settings, bucket, key)  # the same trust boundary as the code's
    try:
        obj = s3_client(settings).get_object(Bucket=bucket, Key=key)
        size = int(obj.get("ContentLength") or 0)
        if size > max_bytes:
            obj["Body"].close()
            raise RunRejected(f"input {key} is {size} bytes; at most {max_bytes}")
        data = obj["Body"].read(max_bytes + 1)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise RunRejected(f"input s3://{bucket}/{key} does not exist") from exc
        raise StorageUnavailable(f"could not fetch input {key}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"could not fetch input {key}: {exc}") from exc
    if len(data) > max_bytes:
        raise RunRejected(f"input {key} exceeds {max_bytes} bytes")
    digest = key.split("/")[1].removeprefix("sha256-")
    if hashlib.sha256(data).hexdigest() != digest:
        raise RunRejected(f"input {key} does not match the sha256 in its name")
    return data


def resolve_stdin(settings: Settings, req: RunRequest) -> bytes | None:
    """The run's stdin: inline, or fetched from S3; both at once is rejected."""
    if req.stdin_s3_key:
        if req.stdin is not None:
            raise RunRejected("give stdin or stdin_s3_key, not both")
        return fetch_input(
            settings, req.s3_bucket, req.stdin_s3_key, settings.limits.max_stdin_bytes
        )
    return stdin_bytes(settings, req.stdin)


def resolve_cases(settings: Settings, req: RunRequest) -> list[dict[str, Any]] | None:
    """The batch's cases (inline or from S3), or None for a plain run."""
    has_cases = req.cases is not None or bool(req.cases_s3_key)
    if has_cases and (req.stdin is not None or req.stdin_s3_key):
        raise RunRejected("a batch takes its input from each case's stdin; give stdin or cases")
    if req.cases_s3_key:
        if req.cases is not None:
            raise RunRejected("give cases or cases_s3_key, not both")
        raw = fetch_input(
            settings, req.s3_bucket, req.cases_s3_key, settings.limits.max_cases_bytes
        )
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RunRejected(f"cases document is not JSON: {exc}") from exc
    return req.cases
