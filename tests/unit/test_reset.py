"""The verified reset, Docker-free: any tree is wiped, any failure is SandboxDirty, never a leak."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest

from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import SandboxDirty
from nanogrid_celery.sandbox import reset as reset_module
from nanogrid_celery.sandbox.lease import LeaseState
from nanogrid_celery.sandbox.reset import reset_container
from nanogrid_celery.sandbox.stub import StubLease


@pytest.fixture
def lease():
    lease = StubLease("python")
    lease.to(LeaseState.ACQUIRED)
    lease.to(LeaseState.RUNNING)
    lease.to(LeaseState.RESETTING)
    yield lease
    shutil.rmtree(lease.host_dir, ignore_errors=True)


def test_a_5000_deep_tree_in_every_scratch_mount_is_wiped(lease):
    for rel in ("tmp", "dev/shm", "sandbox"):
        fd = os.open(lease.root_view / rel, os.O_RDONLY)
        for _ in range(5000):
            os.mkdir("d\n", dir_fd=fd)
            sub = os.open("d\n", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(fd)
    reset_container(Settings(), lease)
    assert all(not os.listdir(lease.root_view / rel) for rel in ("tmp", "dev/shm", "sandbox"))


def test_any_exception_in_the_reset_is_sandbox_dirty(lease, monkeypatch):
    def boom(path, keep=frozenset()):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(reset_module, "empty_dir", boom)
    with pytest.raises(SandboxDirty, match="RecursionError"):
        reset_container(Settings(), lease)


def test_ipc_is_swept_only_when_a_run_may_have_left_some(lease, monkeypatch):
    sweeps = []
    monkeypatch.setattr(lease, "in_namespaces", lambda resize, sweep_ipc: sweeps.append(sweep_ipc))
    lease.ipc_maybe = False
    reset_container(Settings(), lease)
    assert sweeps == []
    lease.ipc_maybe = True
    reset_container(Settings(), lease)
    assert sweeps == [True] and lease.ipc_maybe is False


def test_a_reset_that_raises_anything_destroys_the_container(monkeypatch):
    """Not only SandboxDirty: whatever the reset raises, the pool destroys and replaces."""
    from nanogrid_celery.sandbox import pool as pool_module
    from nanogrid_celery.sandbox.pool import WarmPool

    from .test_pool import FakeLease

    created, destroyed = [], []

    def create(settings, client, executor, runtime, role="pool"):
        created.append(FakeLease(runtime))
        return created[-1]

    def reset(lease):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(pool_module, "create_container", create)
    monkeypatch.setattr(pool_module, "destroy", destroyed.append)
    monkeypatch.setattr(pool_module, "reap_orphans", lambda settings, client: 0)
    pool = WarmPool(Settings(pool_python=1, pool_cpp=0), client=None, executor=None, reset=reset)
    pool.start()
    try:
        assert pool.wait_ready(5)
        lease = pool.acquire("python")
        pool.release(lease)
        deadline = time.monotonic() + 5
        while (lease not in destroyed or len(created) < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lease in destroyed
        assert len(created) == 2, "the discarded container was replaced"
    finally:
        pool.shutdown()


def _spawn(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(list(argv), **kwargs)


def test_between_cases_only_the_agents_root_handler_and_spare_are_kept(lease):
    """Real processes: keeper = this test; handler = its root child; spare = the handler's.

    A root process that is not the keeper's child, and a child of the keeper that is not
    root (a program), are not the agent's: the reset must not keep them.
    """
    # handler (root, child of the keeper) with a spare (root, child of the handler)
    script = "import subprocess, time\np = subprocess.Popen(['sleep', '30'])\n"
    script += "print(p.pid, flush=True)\ntime.sleep(30)"
    handler = _spawn(sys.executable, "-c", script, stdout=subprocess.PIPE)
    spare = int(handler.stdout.readline())
    program = _spawn("sleep", "30", user=65534, group=65534)  # the keeper's child, not root
    stranger = _spawn("sh", "-c", "sleep 30 & echo $!; wait", stdout=subprocess.PIPE)
    orphan_like = int(stranger.stdout.readline())  # root, but its parent is not the keeper
    try:
        lease.keep_pids = {lease.init_pid, os.getpid()}
        procs = {lease.init_pid, os.getpid(), handler.pid, spare, program.pid, orphan_like}
        lease.cgroup.procs = lambda: procs  # type: ignore[method-assign]
        assert reset_module.agent_helpers(lease) == {handler.pid, spare}
    finally:
        for proc in (handler, program, stranger):
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(spare, 9)
            os.kill(orphan_like, 9)


def test_a_batch_reset_keeps_the_limits_for_the_next_case_to_set(lease):
    sets = []
    lease.cgroup.set_memory_limit = lambda n: sets.append(n)  # type: ignore[method-assign]
    reset_container(Settings(), lease, between_cases=True, keep_agent=True)
    assert sets == []
    reset_container(Settings(), lease)
    assert sets == [Settings().limits.default_memory_mb * MB]


def _place(lease, mode=0o755):
    path = lease.root_view / "tmp" / "bin"
    path.write_bytes(b"\x7fELF binary")
    path.chmod(mode)
    return reset_module.Placed.at(lease.root_view, "/tmp/bin")


def test_a_placed_binary_stays_through_a_batch_reset_only_while_unchanged(lease):
    placed = _place(lease)
    (lease.root_view / "tmp" / "left-behind").write_text("x")
    assert reset_container(Settings(), lease, keep_agent=True, keep_file=placed) is True
    assert sorted(os.listdir(lease.root_view / "tmp")) == ["bin"]
    os.chmod(lease.root_view / "tmp" / "bin", 0o777)  # anything about it changed: wiped too
    assert reset_container(Settings(), lease, keep_agent=True, keep_file=placed) is False
    assert os.listdir(lease.root_view / "tmp") == []


def test_a_replaced_binary_is_wiped_not_kept(lease):
    placed = _place(lease)
    os.unlink(lease.root_view / "tmp" / "bin")
    (lease.root_view / "tmp" / "bin").write_bytes(b"\x7fELF other")  # a new inode, same name
    os.chmod(lease.root_view / "tmp" / "bin", 0o755)
    assert reset_container(Settings(), lease, keep_agent=True, keep_file=placed) is False
    assert os.listdir(lease.root_view / "tmp") == []
