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

Between two cases of one batch the agent's handler stays and keeps the next
case's spare process (forked while the host resets, instead of ~2.6 ms of
two forks after it: measured in a 100-case batch, agent round trip 6.3 ->
3.7 ms). So ``keep_agent`` spares exactly those: processes whose real,
effective, saved and filesystem uids are all 0 and whose parent is the keeper
(a handler) or such a handler (its spare). No program can be one: programs
run as the sandbox user, with every capability dropped and
``no-new-privileges`` (no setuid binary can make them root). A handler
holds the previous case's request and header in its memory (never its
output or stdin): the same submission's, which is why only a batch keeps it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import SandboxDirty
from nanogrid_celery.sandbox.lease import Lease
from nanogrid_celery.sandbox.scratch import SHARES
from nanogrid_celery.sandbox.wipe import empty_dir

SCRATCH_DIRS = tuple(SHARES)  # every writable mount: sandbox (cwd + stdin), tmp, dev/shm


def reset_container(
    settings: Settings,
    lease: Lease,
    between_cases: bool = False,
    keep_agent: bool = False,
    keep_file: Placed | None = None,
) -> bool:
    """Kill leftovers, wipe scratch and code, restore limits; raise SandboxDirty if unsure.

    ``between_cases``: the limits stay (the next case of the batch sets its own).
    ``keep_agent``: between two cases of a batch, the agent's handler and spare stay.
    ``keep_file``: a file we placed (a batch's binary) stays if it is exactly as placed;
    returns whether it did (else it was wiped with the rest and must be placed again).
    """
    cg = lease.cgroup
    try:
        keep = lease.keep_pids | agent_helpers(lease) if keep_agent else lease.keep_pids
        cg.kill_all_except(keep)
        procs = cg.procs()
        left = procs - keep
        if left:
            raise SandboxDirty(f"processes survived the kill: {sorted(left)}")
        if not lease.keep_pids <= procs:
            raise SandboxDirty("the container's init or keeper died")
        kept = keep_file is not None and keep_file.unchanged(lease.root_view)
        keep = {rel: frozenset() for rel in SCRATCH_DIRS}
        if kept:
            assert keep_file is not None
            keep[keep_file.dir] = frozenset({keep_file.name})
        for rel in SCRATCH_DIRS:
            empty_dir(lease.root_view / rel, keep[rel])
        if lease.ipc_maybe:
            lease.in_namespaces(None, sweep_ipc=True)  # verifies, or raises
            lease.ipc_maybe = False
        if not between_cases:  # a batch's next case sets its own limits right away
            lim = settings.limits
            lease.run_limits = None
            cg.set_memory_limit(lim.default_memory_mb * MB)
            cg.set_pids_limit(lim.pids)
        for rel in SCRATCH_DIRS:
            if any(p.name not in keep[rel] for p in (lease.root_view / rel).iterdir()):
                raise SandboxDirty(f"/{rel} is not empty after the wipe")
        if kept and not keep_file.unchanged(lease.root_view):  # type: ignore[union-attr]
            raise SandboxDirty(f"/{keep_file.dir}/{keep_file.name} changed during the reset")  # type: ignore[union-attr]
        return kept
    except SandboxDirty:
        raise
    except Exception as exc:  # anything unforeseen: never reuse the container
        raise SandboxDirty(f"reset failed: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Placed:
    """A file the host placed in a scratch dir: root-owned, 0755, one link, this inode/size/mtime.

    None of that can change without root: the sandbox user can neither write it (0755
    root's), nor rename or delete it (``/tmp`` is sticky), nor link it
    (``protected_hardlinks``), nor touch its times (not its owner).
    """

    dir: str  # one of SCRATCH_DIRS, e.g. "tmp"
    name: str
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def at(cls, root: Path, path: str) -> Placed:
        rel, _, name = path.strip("/").rpartition("/")
        st = os.lstat(root / rel / name)
        return cls(rel, name, st.st_ino, st.st_size, st.st_mtime_ns)

    def unchanged(self, root: Path) -> bool:
        try:
            st = os.lstat(root / self.dir / self.name)
        except OSError:
            return False
        return (
            stat.S_ISREG(st.st_mode)
            and stat.S_IMODE(st.st_mode) == 0o755
            and st.st_uid == 0
            and st.st_nlink == 1
            and (st.st_ino, st.st_size, st.st_mtime_ns) == (self.ino, self.size, self.mtime_ns)
        )


def agent_helpers(lease: Lease) -> set[int]:
    """The agent's own root processes: its handler and the handler's spare (see module doc)."""
    keeper = lease.keep_pids - {lease.init_pid}
    parents: dict[int, int] = {}
    for pid in lease.cgroup.procs() - lease.keep_pids:
        ppid = _root_parent(pid)
        if ppid is not None:
            parents[pid] = ppid
    handlers = {pid for pid, ppid in parents.items() if ppid in keeper}
    return handlers | {pid for pid, ppid in parents.items() if ppid in handlers}


def _root_parent(pid: int) -> int | None:
    """``pid``'s parent if every uid of ``pid`` is 0, else None (also when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    ppid = uids = None
    for line in text.splitlines():
        if line.startswith(b"PPid:"):
            ppid = int(line.split()[1])
        elif line.startswith(b"Uid:"):
            uids = line.split()[1:]
    return ppid if uids and all(u == b"0" for u in uids) else None


def container_alive(lease: Lease) -> bool:
    """The container's init and keeper still run: a program cannot kill them (root-owned)."""
    try:
        return lease.keep_pids <= lease.cgroup.procs()
    except OSError:
        return False
