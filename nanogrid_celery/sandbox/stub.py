"""Docker-free stand-ins for the pool, the executor and a container's cgroup.

Shipped for tests, as dramatiq ships ``brokers/stub.py``: with them the
runner's whole request path - limits, fetch, hooks, retries, reject and
internal-error handling, the lease life cycle - runs in milliseconds without
Docker (tests/unit/test_runner.py). A :class:`StubExecutor` answers each
step from a script; a :class:`StubPool` hands out :class:`StubLease` objects
backed by a temporary directory and a :class:`StubCgroup`.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogrid_celery.execution.runtimes import RUNTIMES
from nanogrid_celery.sandbox.executors import Step
from nanogrid_celery.sandbox.lease import Lease, LeaseState
from nanogrid_celery.sandbox.outcome import ProcessResult
from nanogrid_celery.sandbox.output import CappedBuffer

Behaviour = Callable[["StubLease", Step], ProcessResult]
_ids = itertools.count(1)


@dataclass
class StubCgroup:
    """A cgroup whose counters the script may move (e.g. ``oom_kill += 1``)."""

    memory: int = 256 << 20
    pids: int = 128
    peak: int = 8 << 20
    oom: int = 0
    cpu: int = 0

    def procs(self) -> set[int]:
        return {1, 2}

    def kill_all_except(self, keep: set[int], timeout: float = 3.0) -> int:
        return 0

    def set_memory_limit(self, limit: int) -> None:
        self.memory = limit

    def set_pids_limit(self, limit: int) -> None:
        self.pids = limit

    def memory_limit(self) -> int:
        return self.memory

    def reset_peak(self) -> None:
        self.peak = 0

    def peak_bytes(self) -> int:
        return self.peak

    def oom_kills(self) -> int:
        return self.oom

    def cpu_ns(self) -> int:
        return self.cpu


@dataclass
class StubContainer:
    id: str = field(default_factory=lambda: f"stub{next(_ids):060d}")


class StubLease(Lease):
    """A lease with a real temporary host directory and a stub cgroup."""

    def __init__(self, runtime: str) -> None:
        host = Path(tempfile.mkdtemp(prefix="nanogrid-stub-"))
        for scratch in ("root/tmp", "root/dev/shm", "root/sandbox"):
            (host / scratch).mkdir(parents=True)
        super().__init__(StubContainer(), runtime, host, {1, 2}, StubCgroup(), 1)  # type: ignore[arg-type]

    def in_namespaces(self, resize: dict[str, int] | None, sweep_ipc: bool) -> None:
        """No namespaces to enter: sizes and IPC sweeps are only recorded."""
        self.scratch_sizes.update(resize or {})

    @property
    def root_view(self) -> Path:
        """A private stand-in for ``/proc/<pid>/root``: a reset never reaches the host's /tmp."""
        return self.host_dir / "root"


def ok(stdout: bytes = b"ok\n", exit_code: int = 0, duration_ms: float = 1.0) -> ProcessResult:
    out = CappedBuffer(1 << 20)
    out.write(stdout)
    return ProcessResult(exit_code, out, CappedBuffer(1 << 20), False, duration_ms)


class StubExecutor:
    """Answers every step with ``behaviour(lease, step)`` (default: exit 0, "ok")."""

    name = "stub"
    keeps_spares = False

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or (lambda lease, step: ok())
        self.steps: list[Step] = []

    def container_options(self, host_dir: Path) -> dict[str, Any]:
        return {}

    def prepare_host(self, host_dir: Path) -> None:
        return None

    def wait_ready(self, lease: Lease) -> bool:
        return True

    def start(self, lease: Lease, step: Step) -> ProcessResult:
        self.steps.append(step)
        return self.behaviour(lease, step)  # type: ignore[arg-type]

    def after_reset(self, lease: Lease) -> None:
        return None


class StubPool:
    """The pool interface over stub leases; ``fail_acquire`` errors are raised first, in order."""

    def __init__(self, reset: Callable[[Lease], None] | None = None) -> None:
        self.reset = reset or (lambda lease: None)
        self.fail_acquire: list[BaseException] = []
        self.leased: list[StubLease] = []
        self.released: list[StubLease] = []
        self.discarded: list[tuple[StubLease, str]] = []

    def start(self) -> None:
        return None

    def shutdown(self) -> int:
        return 0

    def acquire(self, runtime: str) -> Lease:
        if self.fail_acquire:
            raise self.fail_acquire.pop(0)
        lease = StubLease(runtime)
        lease.to(LeaseState.ACQUIRED)
        self.leased.append(lease)
        return lease

    def release(self, lease: Lease) -> None:
        try:
            self.reset(lease)
        except Exception as exc:
            self.discard(lease, str(exc))
            return
        lease.to(LeaseState.RELEASED)
        self.released.append(lease)  # type: ignore[arg-type]

    def discard(self, lease: Lease, reason: str) -> None:
        lease.to(LeaseState.DISCARDED)
        self.discarded.append((lease, reason))  # type: ignore[arg-type]

    def states(self) -> dict[str, dict[str, int]]:
        return {rt: {"idle": 0, "busy": 0, "starting": 0} for rt in RUNTIMES}
