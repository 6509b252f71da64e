"""How a sandbox container is made, found and destroyed (one place for the hardening).

Every container is created from :func:`create_kwargs`: no network, read-only
root, tmpfs scratch, all capabilities dropped, no-new-privileges, pids/memory/
CPU limits and an init that reaps zombies. The only host path it sees is its
own lease directory, mounted read-only at ``/sandbox`` (with the agent executor
also the lease's private control directory at ``/run/nanogrid``: mode 0700,
root only, where the in-container agent listens; the agent keeps SETUID and
SETGID to drop each program to the sandbox user). Labels carry the worker
host, pid and process start time so a later worker can tell an orphan (its
owner is gone) from a sibling's live container.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.errors import APIError, NotFound
from docker.models.containers import Container

from nanogrid_celery.config import Settings
from nanogrid_celery.sandbox.cgroups import ContainerCgroup

log = logging.getLogger(__name__)

LABEL = "nanogrid"
SANDBOX_DIR = "/sandbox"
CODE_DIR = "/sandbox/code"
STDIN_PATH = "/sandbox/stdin"
# agent executor: a second, private host dir (0700, so the sandbox user cannot enter it) holds
# the agent script and its socket; only root inside the container (the agent) can use it
CTL_DIR = "/run/nanogrid"
AGENT_SOURCE = Path(__file__).with_name("guest") / "agent.py"
AGENT_COMMAND = ["python3", "-u", "-B", f"{CTL_DIR}/agent.py", "--kill-scope", "uid"]
AGENT_READY_TIMEOUT = 10.0


def process_start_time(pid: int) -> str:
    """Start time of ``pid`` in clock ticks since boot: with the pid it names a process uniquely."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def owner_labels(settings: Settings) -> dict[str, str]:
    pid = os.getpid()
    return {
        LABEL: "1",
        f"{LABEL}.instance": settings.instance,
        f"{LABEL}.host": socket.gethostname(),
        f"{LABEL}.pid": str(pid),
        f"{LABEL}.pstart": process_start_time(pid),
    }


@dataclass
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

    @property
    def id(self) -> str:
        return self.container.id

    @property
    def short_id(self) -> str:
        return self.container.id[:12]

    @property
    def code_dir(self) -> Path:
        return self.host_dir / "code"

    @property
    def root_view(self) -> Path:
        """The container's filesystem as seen from the host (for wiping tmpfs scratch)."""
        return Path(f"/proc/{self.init_pid}/root")


def ctl_dir(host_dir: Path) -> Path:
    """The lease's control directory (agent script + socket), a sibling of its code dir."""
    return host_dir.with_name(host_dir.name + ".ctl")


def agent_socket(host_dir: Path) -> Path:
    return ctl_dir(host_dir) / "agent.sock"


def _remove_lease_dirs(host_dir: Path | str) -> None:
    shutil.rmtree(host_dir, ignore_errors=True)
    shutil.rmtree(ctl_dir(Path(host_dir)), ignore_errors=True)


def create_kwargs(settings: Settings, runtime: str, host_dir: Path, role: str) -> dict:
    lim = settings.limits
    memory = lim.default_memory_mb * 1024 * 1024
    labels = owner_labels(settings) | {f"{LABEL}.runtime": runtime, f"{LABEL}.role": role}
    kwargs = {
        "image": settings.image_for(runtime),
        "command": ["sleep", "infinity"],
        "name": f"nanogrid-{settings.instance}-{runtime}-{uuid.uuid4().hex[:10]}",
        "labels": labels,
        "detach": True,
        "init": True,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {
            "/tmp": f"rw,exec,nosuid,nodev,size={lim.tmpfs_mb}m,mode=1777",
        },
        "volumes": {str(host_dir): {"bind": SANDBOX_DIR, "mode": "ro"}},
        "working_dir": SANDBOX_DIR,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": lim.pids,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": int(lim.cpus * 1e9),
        "environment": {"HOME": "/tmp", "LANG": "C.UTF-8"},
    }
    if settings.executor == "agent":  # root agent drops to the sandbox user: SETUID/SETGID only
        kwargs["command"] = AGENT_COMMAND
        kwargs["volumes"][str(ctl_dir(host_dir))] = {"bind": CTL_DIR, "mode": "rw"}
        kwargs["cap_add"] = ["SETUID", "SETGID"]
    return kwargs


def create_container(
    settings: Settings, client: docker.DockerClient, runtime: str, role: str = "pool"
) -> Lease:
    """Create and start one hardened container with its own (empty) lease directory."""
    base = Path(settings.work_root) / settings.instance
    host_dir = base / uuid.uuid4().hex
    (host_dir / "code").mkdir(parents=True, mode=0o755)
    host_dir.chmod(0o755)
    kwargs = create_kwargs(settings, runtime, host_dir, role)
    agent = settings.executor == "agent"
    try:
        if agent:
            _stage_agent(ctl_dir(host_dir))
        container = client.containers.run(**kwargs)
        container.reload()
    except Exception:
        _remove_lease_dirs(host_dir)
        raise
    (host_dir / "container").write_text(container.id)
    init_pid = int(container.attrs["State"]["Pid"])
    cgroup = ContainerCgroup(container.id, init_pid)
    keep: set[int] = set()
    for _ in range(100):  # the keeper (sleep) appears a moment after init
        keep = cgroup.procs()
        if len(keep) >= 2:
            break
        time.sleep(0.005)
    lease = Lease(container, runtime, host_dir, keep, cgroup, init_pid)
    if agent and not _wait_for_agent(lease):
        destroy(lease)
        raise RuntimeError(f"agent in {lease.short_id} did not come up")
    return lease


def _stage_agent(path: Path) -> None:
    """Private control dir: root-only, so the sandbox user cannot reach the agent's socket."""
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    shutil.copyfile(AGENT_SOURCE, path / "agent.py")
    (path / "agent.py").chmod(0o600)


def _wait_for_agent(lease: Lease) -> bool:
    """The agent renames its socket into place once it accepts (~30 ms of Python start-up)."""
    sock = agent_socket(lease.host_dir)
    deadline = time.monotonic() + AGENT_READY_TIMEOUT
    while time.monotonic() < deadline:
        if sock.exists():
            return True
        if lease.init_pid and not Path(f"/proc/{lease.init_pid}").exists():
            return False
        time.sleep(0.003)
    return False


def destroy(lease: Lease) -> None:
    """Remove the container and its lease directory; never raises."""
    with contextlib.suppress(NotFound, APIError):
        lease.container.remove(force=True)
    _remove_lease_dirs(lease.host_dir)


def _owner_alive(labels: dict[str, str]) -> bool:
    try:
        pid = int(labels.get(f"{LABEL}.pid", "0"))
    except ValueError:
        return False
    if pid <= 0 or not Path(f"/proc/{pid}").exists():
        return False
    return process_start_time(pid) == labels.get(f"{LABEL}.pstart", "")


def reap_orphans(settings: Settings, client: docker.DockerClient) -> int:
    """Remove this host's containers whose owning worker process is gone (crash, SIGKILL)."""
    filters = {
        "label": [
            f"{LABEL}=1",
            f"{LABEL}.instance={settings.instance}",
            f"{LABEL}.host={socket.gethostname()}",
        ]
    }
    removed = 0
    for container in client.containers.list(all=True, filters=filters):
        if _owner_alive(container.labels):
            continue
        removed += _remove_with_dirs(container)
    if removed:
        log.info("reaped orphan containers", extra={"fields": {"count": removed}})
    return removed


def _mounted_dir(container: Container) -> str | None:
    for mount in container.attrs.get("Mounts", []):
        if mount.get("Destination") == SANDBOX_DIR:
            return mount.get("Source")
    return None


def remove_all(client: docker.DockerClient, instance: str | None = None) -> int:
    """Remove every NanoGrid container (of one instance, if given): ``nanogrid cleanup``."""
    labels = [f"{LABEL}=1"] + ([f"{LABEL}.instance={instance}"] if instance else [])
    removed = 0
    for container in client.containers.list(all=True, filters={"label": labels}):
        removed += _remove_with_dirs(container)
    return removed


def remove_owned(settings: Settings, client: docker.DockerClient) -> int:
    """Remove every container labelled as this process's own, tracked by the pool or not.

    A removal that failed while the Docker daemon was down (a restart) leaves a
    container the pool no longer tracks; this label sweep at shutdown finds it.
    """
    labels = owner_labels(settings)
    filters = {"label": [f"{k}={v}" for k, v in labels.items() if v]}
    removed = 0
    for container in client.containers.list(all=True, filters=filters):
        removed += _remove_with_dirs(container)
    return removed


def _remove_with_dirs(container: Container) -> int:
    """Force-remove a container and its lease directories; 1 if it was removed here."""
    host_dir = _mounted_dir(container)
    removed = 0
    with contextlib.suppress(NotFound, APIError):
        container.remove(force=True)
        removed = 1
    if host_dir:
        _remove_lease_dirs(host_dir)
    return removed
