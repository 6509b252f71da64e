"""Which S3 locations a task may name: the trust boundary for code (issue 11, class 8).

A task carries ``s3_bucket``/``s3_key`` and the worker reads them with *its own*
credentials, then hands the bytes to the program (a ``cpp`` run of any text object
prints its lines in the compiler message). Without a check, whoever can enqueue can
read every object the worker's role reaches. So a task may only name locations in
``NANOGRID_ALLOWED_CODE_LOCATIONS`` - a comma list of ``bucket`` (the whole bucket)
or ``bucket/prefix`` (keys under ``prefix/``) - which defaults to the code bucket
``NANOGRID_S3_BUCKET`` alone. The check is pure string work, done before any S3 call,
so a refused location costs no request and reveals nothing about what exists.
See docs/threat-model.md.
"""

from __future__ import annotations

from nanogrid_celery.config import Settings
from nanogrid_celery.errors import RunRejected

Location = tuple[str, str]  # (bucket, key prefix ending in "/" or "" for the whole bucket)


def parse_locations(spec: str, default_bucket: str) -> tuple[Location, ...]:
    """``"code, shared/tenant-a"`` -> ``(("code", ""), ("shared", "tenant-a/"))``."""
    out: list[Location] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        bucket, _, prefix = item.partition("/")
        prefix = prefix.strip("/")
        out.append((bucket, f"{prefix}/" if prefix else ""))
    return tuple(out) if out else ((default_bucket, ""),)


def allowed_locations(settings: Settings) -> tuple[Location, ...]:
    return parse_locations(settings.allowed_code_locations, settings.s3_bucket)


def check_location(settings: Settings, bucket: str, key: str) -> None:
    """Raise :class:`RunRejected` unless ``s3://bucket/key`` is inside an allowed location.

    S3 keys are literal, but some S3-compatible stores and proxies normalise ``..``
    and ``.`` segments, which would step out of an allowed prefix: such keys are refused.
    """
    if any(part in {".", ".."} for part in key.split("/")):
        raise RunRejected(f"s3://{bucket}/{key}: '.' and '..' segments are not allowed in keys")
    for allowed_bucket, prefix in allowed_locations(settings):
        if bucket == allowed_bucket and key.startswith(prefix):
            return
    raise RunRejected(
        f"s3://{bucket}/{key} is not an allowed code location "
        "(NANOGRID_ALLOWED_CODE_LOCATIONS; default: the code bucket)"
    )
