"""Back to pristine: after every run a container is reset and *verified*, or destroyed.

Reset kills every process but the container's init and keeper through the
pids cgroup (~0.2 ms; killing the exec's pid would leave its children), wipes
every writable mount - ``/sandbox`` (working directory and stdin), ``/tmp``,
``/dev/shm`` - through ``/proc/<init pid>/root``, from the host, so no
``docker exec`` at 55-80 ms (``wipe.empty_dir``: any depth, no recursion),
removes every SysV and POSIX IPC object when the run may have made one
(``nsops``: a 160 MiB shm segment left behind stayed charged to every later
tenant), and restores the default limits. Then it checks: no process left,
init and keeper alive, every wiped directory empty, no IPC object. Anything it
cannot verify - and any exception at all - raises :class:`SandboxDirty`, and
the pool destroys the container instead of reusing it.
"""

from __future__ import annotations

from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import SandboxDirty
from nanogrid_celery.sandbox.lease import Lease
from nanogrid_celery.sandbox.scratch import SHARES
from nanogrid_celery.sandbox.wipe import empty_dir

SCRATCH_DIRS = tuple(SHARES)  # every writable mount: sandbox (cwd + stdin), tmp, dev/shm


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
        if lease.ipc_maybe:
            lease.in_namespaces(None, sweep_ipc=True)  # verifies, or raises
            lease.ipc_maybe = False
        lim = settings.limits
        cg.set_memory_limit(lim.default_memory_mb * MB)
        cg.set_pids_limit(lim.pids)
        for rel in SCRATCH_DIRS:
            if any((lease.root_view / rel).iterdir()):
                raise SandboxDirty(f"/{rel} is not empty after the wipe")
    except SandboxDirty:
        raise
    except Exception as exc:  # anything unforeseen: never reuse the container
        raise SandboxDirty(f"reset failed: {type(exc).__name__}: {exc}") from exc


def container_alive(lease: Lease) -> bool:
    """The container's init and keeper still run: a program cannot kill them (root-owned)."""
    try:
        return lease.keep_pids <= lease.cgroup.procs()
    except OSError:
        return False
