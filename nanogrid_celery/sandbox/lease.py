"""A container's life as a lease, with explicit states (as piston's ``job.js`` does for a job).

::

    created ──▶ released (idle in the warm pool) ──▶ acquired ──▶ running ──▶ resetting
       │              ▲                                 │            │            │
       │              └─────────────────────────────────┴────────────┴────────────┘
       └──────────────────────────────▶ discarded (destroyed, never reused) ◀──── any

Every hand-over goes through :meth:`Lease.to`, which refuses a transition the
diagram does not have: a container that is mid-reset can never be handed to a
run, and a discarded one never comes back. The pool owns ``released`` /
``acquired`` / ``discarded``; the sandbox owns ``running`` / ``resetting``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from docker.models.containers import Container

from nanogrid_celery.errors import InternalError
from nanogrid_celery.sandbox.cgroups import ContainerCgroup


class LeaseState(StrEnum):
    CREATED = "created"
    RELEASED = "released"
    ACQUIRED = "acquired"
    RUNNING = "running"
    RESETTING = "resetting"
    DISCARDED = "discarded"


_ALLOWED: dict[LeaseState, set[LeaseState]] = {
    LeaseState.CREATED: {LeaseState.RELEASED, LeaseState.ACQUIRED},
    LeaseState.RELEASED: {LeaseState.ACQUIRED},
    LeaseState.ACQUIRED: {LeaseState.RUNNING, LeaseState.RELEASED},
    LeaseState.RUNNING: {LeaseState.RESETTING, LeaseState.RUNNING, LeaseState.RELEASED},
    LeaseState.RESETTING: {LeaseState.RELEASED},
    LeaseState.DISCARDED: set(),
}


class LeaseStateError(InternalError):
    """A hand-over the life cycle does not allow (a bug of ours, never the program's)."""


@dataclass(eq=False)
class Lease:
    """A running container handed to one request at a time, plus what we know about it."""

    container: Container
    runtime: str
    host_dir: Path
    keep_pids: set[int]
    cgroup: ContainerCgroup
    init_pid: int
    start: str = "warm"
    uses: int = 0
    created_at: float = field(default_factory=time.monotonic)
    state: LeaseState = LeaseState.CREATED
    scratch_sizes: dict[str, int] = field(default_factory=dict)  # tmpfs sizes now mounted
    ipc_maybe: bool = True  # a run may have left IPC objects: the reset sweeps them
    # (memory bytes, pids, memory limit read back) last written for a run step; None after
    # anything else wrote the limits (a reset, a compile): a batch's cases under unchanged
    # limits skip three cgroup writes and a read each
    run_limits: tuple[int, int, int] | None = None

    def to(self, state: LeaseState) -> None:
        """Move to ``state``; anything may be discarded, other moves follow the diagram."""
        if state != LeaseState.DISCARDED and state not in _ALLOWED[self.state]:
            raise LeaseStateError(f"lease {self.short_id}: cannot go from {self.state} to {state}")
        self.state = state

    @property
    def id(self) -> str:
        return self.container.id

    @property
    def short_id(self) -> str:
        return self.container.id[:12]

    @property
    def code_dir(self) -> Path:
        """The run's writable working directory, on the container's ``/sandbox`` tmpfs."""
        return self.root_view / "sandbox" / "code"

    @property
    def ctl_dir(self) -> Path:
        return ctl_dir(self.host_dir)

    def in_namespaces(self, resize: dict[str, int] | None, sweep_ipc: bool) -> None:
        """Resize scratch mounts and/or sweep IPC inside the container (``nsops``)."""
        from nanogrid_celery.sandbox.nsops import in_container

        in_container(self.init_pid, resize, sweep_ipc)

    @property
    def root_view(self) -> Path:
        """The container's filesystem as seen from the host (for wiping tmpfs scratch)."""
        return Path(f"/proc/{self.init_pid}/root")


def ctl_dir(host_dir: Path) -> Path:
    """The lease's control directory (agent script + socket), a sibling of its code dir."""
    return host_dir.with_name(host_dir.name + ".ctl")
