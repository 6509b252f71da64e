"""Direct reads and writes of a container's cgroup files from the host, on cgroup v1 and v2.

Why not the Docker API: ``stats()`` takes 1-2 s and ``update()`` ~30 ms, while a
cgroup file read is ~13 us. Everything the sandbox needs per run - kill every
leftover process, measure one run's peak memory, count OOM kills, CPU time, set
the memory and pids limits - is a file here.

Finding the cgroup: from ``/proc/<init pid>/cgroup`` (the container's init), so
Docker's cgroupfs driver (``docker/<id>``) and systemd driver
(``system.slice/docker-<id>.scope``) both work; the old path guesses remain as a
fallback when no pid is given.

cgroup v1 (our machines and CI): per-controller directories; the per-run peak is
``memory.max_usage_in_bytes``, reset by writing 0 before each run.

cgroup v2 (Debian 12/13, Ubuntu 22.04+, RHEL 9): one directory ``C`` per
container; limits stay on ``C`` (``memory.max``, ``memory.swap.max`` = 0,
``pids.max``; CPU quota is Docker's ``cpu.max``), and OOM kills (``memory.events``
``oom_kill``) and CPU time (``cpu.stat`` ``usage_usec``) are read on ``C``: both
are hierarchical. The per-run peak cannot come from ``C``'s ``memory.peak``: it
is missing before kernel 5.19, cannot be reset on 6.1 (the write fails with EIO),
and is resettable only per open fd from 6.12. Design - one fresh child cgroup per
run (a *leaf*, ``C/nanogrid-run.<n>``):

* v2's no-internal-processes rule: ``C`` may enable the memory controller for
  children only while it holds no process, so on first use every process of ``C``
  (init and the keeper: ``sleep`` or the agent) moves into a leaf, then
  ``+memory`` goes into ``C/cgroup.subtree_control``.
* Before each run, :meth:`ContainerCgroup.reset_peak` makes a new leaf and moves
  every process there (init, the agent and its pre-forked spare). A new cgroup's
  ``memory.peak`` starts at zero, so after the run it is that run's peak on every
  kernel that has the file (5.19+: Debian 12's 6.1 and 13's 6.12 alike).
  ``docker exec`` processes land there too: runc cannot join ``C`` (EBUSY, it has
  controllers for children) and falls back to the cgroup of the container's init;
  the agent forks each run, so its programs inherit the leaf.
* The process sweep (:meth:`ContainerCgroup.kill_all_except`) moves the keepers to
  a new leaf and writes ``cgroup.kill`` (5.14+) in the old ones: one atomic kill
  that a fork bomb cannot outrun; any other non-keeper anywhere in the tree gets
  SIGKILL too. A timed-out ``docker exec`` whose process runc had not yet placed in
  the cgroup (a late start under TCG) escapes any single sweep: the exec executor
  repeats the sweep until its stream closes (``executors/docker_exec.py``). Without
  ``cgroup.kill`` it falls back to the SIGKILL loop over ``cgroup.procs`` of v1.
* On kernels without ``memory.peak`` (< 5.19) ``peak_memory_bytes`` is None.

Measured (make test-cgroup2, agent executor; 10/100/200 MiB Python programs): v1 host
19.2/109.2/209.4 MiB (v1's counter includes the container's own ~9 MiB), Debian 13
(6.12) 11.2/101.0/201.4 MiB: the leaf holds only what the run itself charged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
LEAF_PREFIX = "nanogrid-run."
MOVE_ATTEMPTS = 50  # passes over a cgroup.procs while moving its processes (forks race us)


def _first_existing(*candidates: Path) -> Path | None:
    for path in candidates:
        if path.is_dir():
            return path
    return None


def _write(path: Path, text: str) -> None:
    """One write to a cgroup file (one place, so unit tests can stand in for the kernel)."""
    path.write_text(text)


def _rmdir(path: Path) -> None:
    """Remove an empty cgroup (its interface files go with it; OSError while populated)."""
    path.rmdir()


def _read_pids(path: Path) -> set[int]:
    try:
        return {int(p) for p in path.read_text().split()}
    except FileNotFoundError:  # a leaf removed while we walked the tree
        return set()


def proc_cgroups(pid: int) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller: path}; the v2 hierarchy's key is ``""``."""
    found: dict[str, str] = {}
    try:
        text = (PROC / str(pid) / "cgroup").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for name in controllers.split(",") if controllers else [""]:
            found[name] = path
    return found


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


class ContainerCgroup:
    """The cgroup directories of one container, found from its init pid (or its full id)."""

    def __init__(self, container_id: str, pid: int | None = None) -> None:
        self.container_id = container_id
        self.v2 = is_v2()
        self.leaf: Path | None = None  # v2: where the keepers live now
        self.run_leaf: Path | None = None  # v2: the leaf of the current run (its peak)
        self._seq = 0
        where = proc_cgroups(pid) if pid else {}
        if self.v2:
            unified = _first_existing(
                *([ROOT / where[""].lstrip("/")] if "" in where else []),
                ROOT / "system.slice" / f"docker-{container_id}.scope",
                ROOT / "docker" / container_id,
            )
            self.memory = self.pids = self.cpu = unified
        else:
            self.memory = self._v1(where, "memory", "memory")
            self.pids = self._v1(where, "pids", "pids")
            self.cpu = self._v1(where, "cpuacct", "cpuacct")

    def _v1(self, where: dict[str, str], controller: str, mount: str) -> Path | None:
        candidates = [ROOT / mount / where[controller].lstrip("/")] if controller in where else []
        return _first_existing(*candidates, ROOT / mount / "docker" / self.container_id)

    @property
    def found(self) -> bool:
        return self.memory is not None and self.pids is not None

    # -- processes -------------------------------------------------------------
    def procs(self) -> set[int]:
        """Host pids of every process in the container (on v2: in its whole subtree)."""
        assert self.pids is not None
        if not self.v2:
            return _read_pids(self.pids / "cgroup.procs")
        found: set[int] = set()
        for directory in self._tree():
            found |= _read_pids(directory / "cgroup.procs")
        return found

    def kill_all_except(self, keep: set[int], timeout: float = 3.0) -> int:
        """SIGKILL every process but ``keep`` until none is left (forks race us; dying ones linger).

        Returns how many processes were killed; the caller verifies with :meth:`procs`.
        """
        if self.v2 and self.memory is not None and (self.memory / "cgroup.kill").exists():
            return self._kill_by_leaf(keep, timeout)
        killed = 0
        deadline = time.monotonic() + timeout
        while True:
            victims = self.procs() - keep
            if not victims or time.monotonic() > deadline:
                return killed
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.0005)

    # -- v2 leaves ---------------------------------------------------------------
    def _tree(self) -> list[Path]:
        """``C`` and its child cgroups (leaves are never nested)."""
        assert self.memory is not None
        dirs = [self.memory]
        with contextlib.suppress(FileNotFoundError), os.scandir(self.memory) as entries:
            dirs += [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
        return dirs

    def _leaves(self) -> list[Path]:
        return [d for d in self._tree()[1:] if d.name.startswith(LEAF_PREFIX)]

    def _new_leaf(self) -> Path:
        assert self.memory is not None
        while True:
            self._seq += 1
            leaf = self.memory / f"{LEAF_PREFIX}{self._seq}"
            try:
                leaf.mkdir()
                return leaf
            except FileExistsError:
                continue

    def _move(self, pids: set[int], dest: Path) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # ESRCH: it exited meanwhile
                _write(dest / "cgroup.procs", str(pid))

    def _move_all(self, sources: list[Path], dest: Path) -> None:
        """Move every process of ``sources`` into ``dest``, until none is left behind."""
        for _ in range(MOVE_ATTEMPTS):
            left = set().union(*(_read_pids(s / "cgroup.procs") for s in sources))
            if not left:
                return
            self._move(left, dest)
        raise OSError(f"processes keep appearing in {[str(s) for s in sources]}")

    def _ensure_leaves(self) -> None:
        """First use on v2: empty ``C`` into a leaf, then enable memory for its children."""
        assert self.memory is not None
        if self.leaf is not None and self.leaf.is_dir():
            return
        leaf = self._new_leaf()
        self._move_all([self.memory, *[d for d in self._leaves() if d != leaf]], leaf)
        available = (self.memory / "cgroup.controllers").read_text().split()
        enabled = (self.memory / "cgroup.subtree_control").read_text().split()
        if "memory" in available and "memory" not in enabled:
            _write(self.memory / "cgroup.subtree_control", "+memory")
        self.leaf = self.run_leaf = leaf

    def _remove_empty_leaves(self, keep: set[Path]) -> None:
        for leaf in self._leaves():
            if leaf not in keep:
                with contextlib.suppress(OSError):  # still populated (a dying process): next time
                    _rmdir(leaf)

    def _kill_by_leaf(self, keep: set[int], timeout: float) -> int:
        """Keepers to a new leaf, then ``cgroup.kill`` everything else (atomic vs. forks)."""
        self._ensure_leaves()
        assert self.memory is not None
        fresh = self._new_leaf()
        self._move(keep, fresh)
        self.leaf = fresh
        doomed = [d for d in self._tree() if d != fresh]
        victims = self.procs() - keep
        deadline = time.monotonic() + timeout
        while True:
            left = self.procs() - keep
            if not left or time.monotonic() > deadline:
                break
            for d in doomed[1:]:  # C itself holds no process once leaves exist
                with contextlib.suppress(FileNotFoundError):
                    _write(d / "cgroup.kill", "1")
            # anything outside the doomed leaves (in C, or one that joined the keepers' new
            # leaf while they moved): the signal path, as on v1
            stray = left - set().union(*(_read_pids(d / "cgroup.procs") for d in doomed[1:]))
            for pid in stray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.0005)
        self._remove_empty_leaves({fresh, *([self.run_leaf] if self.run_leaf else [])})
        return len(victims)

    # -- memory ----------------------------------------------------------------
    def _mem(self, name: str) -> Path:
        assert self.memory is not None
        return self.memory / name

    def reset_peak(self) -> None:
        """Start measuring a new run's peak (v1: reset the counter; v2: a fresh leaf)."""
        if not self.v2:
            self._mem("memory.max_usage_in_bytes").write_text("0")
            return
        self._ensure_leaves()
        fresh = self._new_leaf()
        self._move_all([d for d in self._tree() if d != fresh], fresh)
        self.leaf = self.run_leaf = fresh
        self._remove_empty_leaves({fresh})

    def peak_bytes(self) -> int | None:
        """Peak memory since :meth:`reset_peak` (None: the kernel has no such counter)."""
        if self.v2:
            path = (self.run_leaf or self._mem("")) / "memory.peak"
        else:
            path = self._mem("memory.max_usage_in_bytes")
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return None

    def usage_bytes(self) -> int:
        name = "memory.current" if self.v2 else "memory.usage_in_bytes"
        return int(self._mem(name).read_text())

    def oom_kills(self) -> int:
        """OOM kills so far; an exec'd process killed by the limit leaves OOMKilled false."""
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in self._mem(name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def memory_limit(self) -> int:
        name = "memory.max" if self.v2 else "memory.limit_in_bytes"
        raw = self._mem(name).read_text().strip()
        return -1 if raw == "max" else int(raw)

    def set_memory_limit(self, limit: int) -> None:
        """Set memory and memory+swap to ``limit`` (no swap), in an order the kernel accepts."""
        if self.v2:
            _write(self._mem("memory.max"), str(limit))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap either
                _write(self._mem("memory.swap.max"), "0")
            return
        memsw = self._mem("memory.memsw.limit_in_bytes")
        has_memsw = memsw.exists()
        if limit > self.memory_limit():
            if has_memsw:
                memsw.write_text(str(limit))
            self._mem("memory.limit_in_bytes").write_text(str(limit))
        else:
            self._mem("memory.limit_in_bytes").write_text(str(limit))
            if has_memsw:
                memsw.write_text(str(limit))

    # -- pids / cpu ------------------------------------------------------------
    def set_pids_limit(self, limit: int) -> None:
        assert self.pids is not None
        _write(self.pids / "pids.max", str(limit))

    def cpu_ns(self) -> int | None:
        """Total CPU time of the container in ns (user+sys of every process)."""
        try:
            if self.v2:
                assert self.cpu is not None
                for line in (self.cpu / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) * 1000
                return None
            assert self.cpu is not None
            return int((self.cpu / "cpuacct.usage").read_text())
        except (OSError, ValueError, AssertionError):
            return None
