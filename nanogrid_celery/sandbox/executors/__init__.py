"""How a process is started inside a leased container: strategies chosen by name.

``NANOGRID_EXECUTOR`` names one (as celery's ``concurrency/__init__.py`` maps
pool names to classes):

* ``agent`` (default) - one Unix-socket call to the in-container agent per
  process (~1 ms; Python forks from a warm interpreter, the zygote);
* ``exec`` - ``docker exec`` per process (55-80 ms each): portable, and the
  benchmark baseline.

Everything else about a run - staging, cgroup limits, OOM detection,
classification, the verified reset - is the executor-independent
:class:`~nanogrid_celery.sandbox.box.Sandbox`, so both give identical results.
An executor also says what its containers need (command, mounts,
capabilities) and when a new one is ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import docker

    from nanogrid_celery.config import Settings
    from nanogrid_celery.sandbox.lease import Lease
    from nanogrid_celery.sandbox.outcome import ProcessResult


@dataclass(frozen=True)
class Step:
    """One process to start: the compile step or the run step of a plan."""

    argv: list[str]
    timeout_ms: int
    stdout_max: int
    stderr_max: int
    stdin: bool  # read /sandbox/stdin (the run step) or nothing (the compile step)
    prepare_next: bool = False  # another step follows at once: the agent may fork its spare now
    env: dict[str, str] | None = None  # on top of paths.ENV (a requirements env's PYTHONPATH)
    rlimits: dict[str, int] | None = None  # nofile / fsize / stack (soft = hard), scratch.py


class Executor(Protocol):
    """Starts processes in leased containers; see the module doc."""

    name: str
    #: a step with ``prepare_next`` leaves root-owned helpers (the agent's handler and
    #: spare) that a batch's reset between cases keeps (``sandbox/reset.py``)
    keeps_spares: bool

    def container_options(self, host_dir: Path) -> dict[str, Any]:
        """Extra ``containers.run`` arguments (command, volumes, capabilities)."""
        ...

    def prepare_host(self, host_dir: Path) -> None:
        """Host-side set-up before a container is created (e.g. stage the agent)."""
        ...

    def wait_ready(self, lease: Lease) -> bool:
        """Block until a new container can run processes; False if it never will."""
        ...

    def start(self, lease: Lease, step: Step) -> ProcessResult:
        """Run one process to completion (or its deadline) and report it."""
        ...

    def after_reset(self, lease: Lease) -> None:
        """Called once the container is verified clean (the agent forks a spare here)."""
        ...


ALIASES = {
    "agent": "nanogrid_celery.sandbox.executors.agent:AgentExecutor",
    "exec": "nanogrid_celery.sandbox.executors.docker_exec:DockerExecExecutor",
}


def get_executor(name: str, settings: Settings, client: docker.DockerClient) -> Executor:
    """The executor ``name`` stands for (``NANOGRID_EXECUTOR``)."""
    try:
        module, _, attr = ALIASES[name].partition(":")
    except KeyError:
        choices = " or ".join(repr(n) for n in ALIASES)
        raise ValueError(f"NANOGRID_EXECUTOR must be {choices}, got {name!r}") from None
    return getattr(import_module(module), attr)(settings, client)
