"""CPU time of the stack's components, from /proc and the containers' cgroups.

Why /proc and not ``docker stats`` or psutil: a component is a process *tree*
(the worker's main process and its prefork children; moto; redis-server) or a
set of processes found by name (dockerd, containerd, one containerd-shim per
container), and ``utime + stime`` (+ ``cutime + cstime`` for children already
reaped) of ``/proc/<pid>/stat`` is exact to the clock tick (10 ms) at no cost.
What runs *inside* the sandboxes (agent, zygote, the user's program) is counted
by each container's cpuacct cgroup instead, so it is not lost in the shim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


@dataclass
class ProcTimes:
    """CPU milliseconds per pid, for the live processes of one snapshot."""

    ms: dict[int, float] = field(default_factory=dict)

    def total(self) -> float:
        return sum(self.ms.values())


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cpu_ms(pid: int) -> float | None:
    """utime + stime + cutime + cstime of ``pid`` in ms (fields 14-17 of /proc/pid/stat)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # after the ")" split, field 3 (state) is index 0, so field n is index n - 3
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) * TICK_MS


def rss_mib(pids: list[int]) -> float:
    """Summed VmRSS of ``pids`` (shared pages count once per process: an upper bound)."""
    kib = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kib += int(line.split()[1])
        except OSError:
            continue
    return kib / 1024


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def parents() -> dict[int, int]:
    out = {}
    for pid in all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            out[pid] = int(fields[1])
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    ppid = parents()
    found, frontier = [root], [root]
    while frontier:
        nxt = [pid for pid, parent in ppid.items() if parent in frontier]
        found += nxt
        frontier = nxt
    return found


def by_name(prefix: str) -> list[int]:
    return [pid for pid in all_pids() if comm(pid).startswith(prefix)]


def snapshot(pids: list[int]) -> ProcTimes:
    times = ProcTimes()
    for pid in pids:
        ms = cpu_ms(pid)
        if ms is not None:
            times.ms[pid] = ms
    return times


def delta_ms(before: ProcTimes, after: ProcTimes) -> float:
    """CPU spent between two snapshots by processes alive in ``after``.

    A process that started in between counts from zero; one that exited in
    between is lost unless its parent reaped it (then it is in the parent's
    cutime) - for the components measured here that is the rare case.
    """
    return sum(ms - before.ms.get(pid, 0.0) for pid, ms in after.ms.items())


def machine_busy_ms() -> float:
    """Busy CPU time of the whole machine (all cores) from /proc/stat, in ms."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) * TICK_MS


def container_cpu_ms(container_ids: list[str]) -> dict[str, float]:
    """CPU of everything inside each container, from its cpuacct cgroup (ns -> ms)."""
    from nanogrid_celery.sandbox.cgroups import ContainerCgroup

    out = {}
    for cid in container_ids:
        cg = ContainerCgroup(cid)
        if cg.cpu is None:
            continue
        ns = cg.cpu_ns()
        if ns is not None:
            out[cid] = ns / 1e6
    return out
