"""Put a request's code and stdin into its container's own ``/sandbox`` tmpfs, from the host.

The working directory is writable (programs write files, sub-directories and
sqlite databases next to their code; ``g++ -o prog main.cpp && ./prog`` builds
in place), so it cannot be a host bind mount shared with the worker: it is the
container's ``/sandbox`` tmpfs (bounded, see ``scratch.py``), written through
``/proc/<init pid>/root`` as the reset wipes it (no ``docker exec``, no host
disk). The code dir and files belong to the sandbox user (writable by the run,
wiped with it); ``/sandbox`` itself and ``stdin`` stay root's and read-only.
The host lease directory holds no code (it is 0700; nothing in it is 0644).
"""

from __future__ import annotations

import os

from nanogrid_celery.errors import InternalError
from nanogrid_celery.sandbox.lease import Lease

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def write_files(
    lease: Lease, files: dict[str, bytes], stdin: bytes | None, owner: tuple[int, int]
) -> None:
    """Stage the code under ``/sandbox/code`` and stdin as ``/sandbox/stdin``."""
    uid, gid = owner
    try:
        root = lease.code_dir
        root.mkdir(mode=0o755, exist_ok=True)
        os.chown(root, uid, gid)
        for name, content in files.items():
            path = root / name
            for parent in reversed(path.relative_to(root).parents[:-1]):
                d = root / parent
                if not d.is_dir():
                    d.mkdir(mode=0o755)
                    os.chown(d, uid, gid)
            _write(path, content, 0o644, uid, gid)
        _write(root.parent / "stdin", stdin or b"", 0o444, 0, 0)
    except OSError as exc:
        raise InternalError(f"could not stage code for the container: {exc}") from exc


def _write(path: os.PathLike, content: bytes, mode: int, uid: int, gid: int) -> None:
    fd = os.open(path, _CREATE, mode)
    try:
        with memoryview(content) as view:
            while view:
                view = view[os.write(fd, view) :]
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
