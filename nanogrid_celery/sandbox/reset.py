"""Back to pristine: after every run a container is reset and *verified*, or destroyed.

Reset kills every process but the container's init and keeper through the
pids cgroup (~0.2 ms; killing the exec's pid would leave its children), wipes
``/tmp``, ``/dev/shm`` (through ``/proc/<init pid>/root``, from the host, so no
``docker exec`` at 55-80 ms) and the code directory, and restores the default
limits. Then it checks: no process left, init and keeper alive, every wiped
directory empty. Anything it cannot verify raises :class:`SandboxDirty` and
the pool destroys the container instead of reusing it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import SandboxDirty
from nanogrid_celery.sandbox.lease import Lease

SCRATCH_DIRS = ("tmp", "dev/shm")


def reset_container(settings: Settings, lease: Lease) -> None:
    """Kill leftovers, wipe scratch and code, restore limits; raise SandboxDirty if unsure."""
    cg = lease.cgroup
    try:
        cg.kill_all_except(lease.keep_pids)
        left = cg.procs() - lease.keep_pids
        if left:
            raise SandboxDirty(f"processes survived the kill: {sorted(left)}")
        if not lease.keep_pids <= cg.procs():
            raise SandboxDirty("the container's init or keeper died")
        for rel in SCRATCH_DIRS:
            empty_dir(lease.root_view / rel)
        empty_dir(lease.code_dir)
        with contextlib.suppress(FileNotFoundError):
            (lease.host_dir / "stdin").unlink()
        lim = settings.limits
        cg.set_memory_limit(lim.default_memory_mb * MB)
        cg.set_pids_limit(lim.pids)
    except SandboxDirty:
        raise
    except OSError as exc:
        raise SandboxDirty(f"reset failed: {exc}") from exc
    for rel in SCRATCH_DIRS:
        if any((lease.root_view / rel).iterdir()):
            raise SandboxDirty(f"/{rel} is not empty after the wipe")
    if any(lease.code_dir.iterdir()):
        raise SandboxDirty("code directory is not empty after the wipe")


def container_alive(lease: Lease) -> bool:
    """The container's init and keeper still run: a program cannot kill them (root-owned)."""
    try:
        return lease.keep_pids <= lease.cgroup.procs()
    except OSError:
        return False


def empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` without following links out of it."""
    with os.scandir(path) as entries:
        for entry in entries:
            full = os.path.join(path, entry.name)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(full)
            else:
                os.unlink(full)
