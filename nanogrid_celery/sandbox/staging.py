"""Put a request's code and stdin where only its lease's container sees them.

The worker writes into the lease's host directory (mounted read-only at
``/sandbox`` inside): ``put_archive`` fails on a read-only root and would
write under a tmpfs invisible to the program, while a host write into the
bind mount costs nothing extra.
"""

from __future__ import annotations

from nanogrid_celery.errors import InternalError
from nanogrid_celery.sandbox.lease import Lease


def write_files(lease: Lease, files: dict[str, bytes], stdin: bytes | None) -> None:
    """Stage the code under ``code/`` and stdin as ``stdin`` in the lease directory."""
    try:
        root = lease.code_dir
        for name, content in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            path.write_bytes(content)
            path.chmod(0o644)
        stdin_file = lease.host_dir / "stdin"
        stdin_file.write_bytes(stdin or b"")
        stdin_file.chmod(0o644)
    except OSError as exc:
        raise InternalError(f"could not stage code for the container: {exc}") from exc
