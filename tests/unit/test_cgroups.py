"""cgroup v1/v2 logic of the sandbox against a fake cgroup tree in a tmp dir (no VM, no Docker).

The fake stands in for the kernel only where a plain file cannot: writing a pid
to ``cgroup.procs`` moves it (and is refused, like v2's no-internal-processes
rule, in a cgroup that has controllers for its children), ``cgroup.kill``
empties a cgroup, and ``memory.peak`` refuses writes as on kernel 6.1. The real
kernels run the same code in ``make test-cgroup2`` (vm/).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nanogrid_celery.sandbox import cgroups
from nanogrid_celery.sandbox.cgroups import LEAF_PREFIX, ContainerCgroup

CID = "c0ffee" * 10 + "abcd"
INIT, KEEPER = 5_000_001, 5_000_002  # above any pid_max: a stray os.kill finds nothing
LEFTOVERS = {5_000_010, 5_000_011}


class FakeKernel:
    """Just the cgroup-file semantics the module relies on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []
        self.killed: set[int] = set()

    def procs_files(self) -> list[Path]:
        return list(self.root.rglob("cgroup.procs"))

    def write(self, path: Path, text: str) -> None:
        rel = str(path.relative_to(self.root))
        self.writes.append((rel, text))
        cg = path.parent
        if path.name == "cgroup.procs":
            pid = int(text)
            control = cg / "cgroup.subtree_control"
            if cg != self.root and control.exists() and control.read_text().split():
                raise OSError(errno.EBUSY, "no internal processes")
            if pid in self.killed:
                raise ProcessLookupError(errno.ESRCH, "gone")
            for f in self.procs_files():
                pids = [p for p in f.read_text().split() if int(p) != pid]
                f.write_text("\n".join(pids))
            old = path.read_text().split() if path.exists() else []
            path.write_text("\n".join([*old, str(pid)]))
        elif path.name == "cgroup.subtree_control":
            if (cg / "cgroup.procs").read_text().split():
                raise OSError(errno.EBUSY, "cgroup has processes")
            path.write_text(" ".join([*path.read_text().split(), text.lstrip("+")]))
        elif path.name == "cgroup.kill":
            procs = cg / "cgroup.procs"
            self.killed |= {int(p) for p in procs.read_text().split()} if procs.exists() else set()
            procs.write_text("")
        elif path.name == "memory.peak":
            raise OSError(errno.EIO, "not resettable on 6.1")
        else:
            path.write_text(text)

    def rmdir(self, path: Path) -> None:
        procs = path / "cgroup.procs"
        if procs.exists() and procs.read_text().split():
            raise OSError(errno.EBUSY, "populated")
        for f in path.iterdir():
            f.unlink()
        path.rmdir()


def _files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


@pytest.fixture
def v2(tmp_path, monkeypatch):
    """A cgroup v2 root with one container under the systemd driver's path."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _files(root, {"cgroup.controllers": "cpu memory pids", "cgroup.procs": ""})
    container = root / "system.slice" / f"docker-{CID}.scope"
    _files(
        container,
        {
            "cgroup.controllers": "cpu memory pids",
            "cgroup.subtree_control": "",
            "cgroup.procs": f"{INIT}\n{KEEPER}",
            "cgroup.kill": "",
            "memory.max": "268435456",
            "memory.swap.max": "max",
            "memory.peak": "123456789",
            "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
            "memory.current": "4096",
            "pids.max": "128",
            "cpu.stat": "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        },
    )
    _files(proc / str(INIT), {"cgroup": f"0::/system.slice/docker-{CID}.scope\n"})
    kernel = FakeKernel(root)
    monkeypatch.setattr(cgroups, "ROOT", root)
    monkeypatch.setattr(cgroups, "PROC", proc)
    monkeypatch.setattr(cgroups, "_write", kernel.write)
    monkeypatch.setattr(cgroups, "_rmdir", kernel.rmdir)
    return kernel, container


def _leaves(container: Path) -> list[Path]:
    return sorted(d for d in container.iterdir() if d.name.startswith(LEAF_PREFIX))


def test_v2_cgroup_is_found_from_proc_for_either_driver(v2, tmp_path):
    _, container = v2
    cg = ContainerCgroup(CID, INIT)
    assert cg.v2 and cg.memory == cg.pids == cg.cpu == container
    cgroupfs = tmp_path / "cgroup" / "docker" / "other"
    cgroupfs.mkdir(parents=True)
    (tmp_path / "proc" / "77").mkdir()
    (tmp_path / "proc" / "77" / "cgroup").write_text("0::/docker/other\n")
    assert ContainerCgroup("other", 77).memory == cgroupfs


def test_v2_first_run_moves_the_container_into_a_leaf_and_enables_memory(v2):
    kernel, container = v2
    cg = ContainerCgroup(CID, INIT)
    cg.reset_peak()
    (leaf,) = _leaves(container)
    assert (container / "cgroup.procs").read_text().split() == []
    assert set(map(int, (leaf / "cgroup.procs").read_text().split())) == {INIT, KEEPER}
    assert "memory" in (container / "cgroup.subtree_control").read_text().split()
    assert cg.procs() == {INIT, KEEPER}
    assert not [w for w in kernel.writes if w[0].endswith("memory.peak")]


def test_v2_peak_is_per_run_even_where_memory_peak_cannot_be_reset(v2):
    _, container = v2
    cg = ContainerCgroup(CID, INIT)
    cg.reset_peak()
    (first,) = _leaves(container)
    (first / "memory.peak").write_text("104857600")  # the run's program peaked at 100 MiB
    assert cg.peak_bytes() == 100 << 20
    cg.reset_peak()
    (second,) = _leaves(container)  # the old leaf is gone, its processes moved on
    assert second != first and not first.exists()
    assert set(map(int, (second / "cgroup.procs").read_text().split())) == {INIT, KEEPER}
    (second / "memory.peak").write_text("10485760")
    assert cg.peak_bytes() == 10 << 20  # not the container's lifetime peak (123456789)


def test_v2_peak_is_none_without_memory_peak(v2):
    _, container = v2
    (container / "memory.peak").unlink()  # kernel < 5.19
    cg = ContainerCgroup(CID, INIT)
    cg.reset_peak()
    assert cg.peak_bytes() is None


def test_v2_sweep_keeps_the_keepers_and_cgroup_kills_the_rest(v2):
    kernel, container = v2
    cg = ContainerCgroup(CID, INIT)
    cg.reset_peak()
    (run_leaf,) = _leaves(container)
    (run_leaf / "memory.peak").write_text("2048")
    for pid in LEFTOVERS:  # what the run forked stays in its leaf
        kernel.write(run_leaf / "cgroup.procs", str(pid))
    assert cg.procs() == {INIT, KEEPER, *LEFTOVERS}
    assert cg.kill_all_except({INIT, KEEPER}) == len(LEFTOVERS)
    assert kernel.killed == LEFTOVERS
    assert (str(run_leaf.relative_to(kernel.root) / "cgroup.kill"), "1") in kernel.writes
    assert cg.procs() == {INIT, KEEPER}
    assert cg.leaf != run_leaf
    assert cg.peak_bytes() == 2048  # the killed run's peak is still readable after the sweep


def test_v2_sweep_without_cgroup_kill_signals_each_process(v2, monkeypatch):
    kernel, container = v2
    (container / "cgroup.kill").unlink()  # kernel < 5.14
    cg = ContainerCgroup(CID, INIT)
    cg.reset_peak()
    (leaf,) = _leaves(container)
    for pid in LEFTOVERS:
        kernel.write(leaf / "cgroup.procs", str(pid))
    signalled = []

    def fake_kill(pid: int, sig: int) -> None:
        signalled.append(pid)
        procs = leaf / "cgroup.procs"
        procs.write_text("\n".join(p for p in procs.read_text().split() if int(p) != pid))

    monkeypatch.setattr(cgroups.os, "kill", fake_kill)
    assert cg.kill_all_except({INIT, KEEPER}) == len(LEFTOVERS)
    assert set(signalled) == LEFTOVERS and cg.procs() == {INIT, KEEPER}


def test_v2_limits_no_swap_oom_and_cpu(v2):
    _, container = v2
    cg = ContainerCgroup(CID, INIT)
    cg.set_memory_limit(64 << 20)
    cg.set_pids_limit(32)
    assert (container / "memory.max").read_text() == str(64 << 20)
    assert (container / "memory.swap.max").read_text() == "0"
    assert (container / "pids.max").read_text() == "32"
    assert cg.memory_limit() == 64 << 20
    assert cg.oom_kills() == 1
    assert cg.cpu_ns() == 2_500_000
    assert cg.usage_bytes() == 4096


def test_v1_is_found_from_proc_and_resets_its_peak_counter(tmp_path, monkeypatch):
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    root.mkdir()
    for mount in ("memory", "pids", "cpuacct"):
        _files(root / mount / "docker" / CID, {"cgroup.procs": f"{INIT}\n{KEEPER}\n"})
    mem = root / "memory" / "docker" / CID
    _files(mem, {"memory.max_usage_in_bytes": "999", "memory.limit_in_bytes": "268435456"})
    _files(
        proc / str(INIT),
        {"cgroup": f"9:pids:/docker/{CID}\n4:memory:/docker/{CID}\n3:cpu,cpuacct:/docker/{CID}\n"},
    )
    monkeypatch.setattr(cgroups, "ROOT", root)
    monkeypatch.setattr(cgroups, "PROC", proc)
    cg = ContainerCgroup(CID, INIT)
    assert not cg.v2 and cg.memory == mem and cg.cpu == root / "cpuacct" / "docker" / CID
    assert cg.procs() == {INIT, KEEPER}
    cg.reset_peak()
    assert cg.peak_bytes() == 0
    assert not [d for d in mem.iterdir() if d.name.startswith(LEAF_PREFIX)]
