"""The exec executor's stop on timeout, Docker-free: a late-starting process is still killed."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from nanogrid_celery.sandbox.executors import docker_exec
from nanogrid_celery.sandbox.executors.docker_exec import _shell, _stop


class LateCgroup:
    """A cgroup whose process appears only after ``appear_after`` sweeps (runc placing it late)."""

    def __init__(self, done: threading.Event, appear_after: int) -> None:
        self.done = done
        self.appear_after = appear_after
        self.sweeps = 0

    def kill_all_except(self, keep: set[int]) -> int:
        self.sweeps += 1
        if self.sweeps > self.appear_after:  # the process is there now: the kill ends the stream
            self.done.set()
            return 1
        return 0


def lease_with(cgroup: object) -> SimpleNamespace:
    return SimpleNamespace(cgroup=cgroup, keep_pids={1})


def test_a_process_that_starts_after_the_deadline_is_killed_by_a_later_sweep():
    done = threading.Event()
    cgroup = LateCgroup(done, appear_after=3)
    assert _stop(lease_with(cgroup), done, grace_s=5)
    assert cgroup.sweeps == 4  # one sweep alone (the old stop) would have found nothing


def test_the_sweep_stops_as_soon_as_the_stream_closes():
    done = threading.Event()
    cgroup = LateCgroup(done, appear_after=0)
    assert _stop(lease_with(cgroup), done, grace_s=5)
    assert cgroup.sweeps == 1


def test_a_stream_that_never_closes_gives_up_after_the_grace(monkeypatch):
    monkeypatch.setattr(docker_exec, "SWEEP_EVERY_S", 0.01)
    done = threading.Event()
    cgroup = LateCgroup(done, appear_after=10**9)
    started = time.monotonic()
    assert not _stop(lease_with(cgroup), done, grace_s=0.2)
    assert 0.2 <= time.monotonic() - started < 2
    assert cgroup.sweeps >= 5  # it kept sweeping the whole grace, not once


def test_the_shell_applies_rlimits_then_becomes_the_program():
    rlimits = {"nofile": 64, "fsize": 1024 * 512, "stack": 8192 * 1024}
    cmd = _shell(SimpleNamespace(rlimits=rlimits, stdin=b"x"))
    want = 'ulimit -n 64 && ulimit -f 1024 && ulimit -s 8192 && exec "$@" < '
    assert cmd == want + docker_exec.STDIN_PATH
