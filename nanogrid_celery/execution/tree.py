"""Prove a submission's names can be staged before any container is touched (issue 11, class 6).

Staging (sandbox/staging.py) writes ``code/<name>`` for every file; it must never fail
on their input, because a failure there is an ``InternalError``: retried on a second
fresh container, so one client could churn the warm pool (before this check a zip with
``a`` and ``a/b`` ended ``internal_error`` after discarding two warm containers). So
the whole tree is built in memory here and every name and every prefix relation is
checked, and anything a Linux filesystem or our own code would refuse is
:class:`RunRejected` with a message:

* a NUL anywhere (zipfile silently truncates ``main.py\\0evil`` to ``main.py``),
* a name that is not UTF-8 (lone surrogates cannot be encoded for the filesystem),
* a component over ``NAME_MAX`` (255 bytes, in bytes not characters),
* a path over ``MAX_PATH_BYTES`` (PATH_MAX 4096 less room for the root it is staged under),
* more than ``MAX_DEPTH`` levels (pathlib's ``mkdir(parents=True)`` recurses per level),
* the same name twice (also after normalising ``./a`` or ``a//b``),
* one name used as both a file and a directory (``a`` and ``a/b``, or a ``a/`` entry and ``a``).
"""

from __future__ import annotations

from collections.abc import Iterable

from nanogrid_celery.errors import RunRejected

NAME_MAX = 255  # bytes per component: ext4, xfs, overlayfs, tmpfs
PATH_MAX = 4096  # bytes per path handed to a syscall, NUL included
STAGING_ROOT_RESERVE = 512  # the host lease dir or the container's work dir in front of the name
MAX_PATH_BYTES = PATH_MAX - STAGING_ROOT_RESERVE
MAX_DEPTH = 64  # directories deep; real projects use < 15


def check_name(name: str, shown: str | None = None) -> None:
    """One normalised relative name (``a/b/c``): every per-name rule."""
    label = repr(shown if shown is not None else name)
    if "\x00" in name:
        raise RunRejected(f"a NUL byte in a file name is not allowed: {label}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RunRejected(f"file name is not valid UTF-8: {label}") from exc
    parts = raw.split(b"/")
    if len(parts) > MAX_DEPTH:
        raise RunRejected(f"path is {len(parts)} levels deep; at most {MAX_DEPTH} allowed")
    if len(raw) > MAX_PATH_BYTES:
        raise RunRejected(
            f"path is {len(raw)} bytes; at most {MAX_PATH_BYTES} allowed: {label:.60}"
        )
    for part in parts:
        if len(part) > NAME_MAX:
            raise RunRejected(
                f"a path component is {len(part)} bytes; at most {NAME_MAX} bytes allowed: "
                f"{label:.60}"
            )


def check_tree(files: Iterable[str], directories: Iterable[str] = ()) -> None:
    """Every name valid, none twice, none both a file and a directory (in any order)."""
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()
    for name in files:
        check_name(name)
        if name in seen_files:
            raise RunRejected(f"submission names {name!r} more than once")
        seen_files.add(name)
        _add_parents(name, seen_dirs)
    for name in directories:
        check_name(name)
        seen_dirs.add(name)
        _add_parents(name, seen_dirs)
    clash = seen_files & seen_dirs
    if clash:
        name = min(clash)
        raise RunRejected(f"submission has {name!r} as both a file and a directory")


def _add_parents(name: str, dirs: set[str]) -> None:
    cut = name.rfind("/")
    while cut > 0:
        parent = name[:cut]
        if parent in dirs:
            return  # its own parents were added with it
        dirs.add(parent)
        cut = name.rfind("/", 0, cut)
