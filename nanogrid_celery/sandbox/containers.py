"""How a sandbox container is made, found and destroyed (one place for the hardening).

Every container is created from :func:`create_kwargs`: no network, read-only
root, tmpfs scratch sized from the memory limit (``scratch.py``: ``/sandbox``
holds the writable working directory, ``/tmp``, ``/dev/shm``), all capabilities
dropped, no-new-privileges, pids/memory/CPU limits and an init that reaps
zombies. No host path is writable or readable by a program: code is staged
into the container's own ``/sandbox`` tmpfs from the host (``staging.py``); the
host lease directory is 0700 and, with the agent executor, holds the private
control directory mounted at ``/run/nanogrid`` (mode 0700, root only, where the
in-container agent listens; the agent keeps SETUID and SETGID to drop each
program to the sandbox user). Labels carry the worker
host, pid and process start time so a later worker can tell an orphan (its
owner is gone) from a sibling's live container.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
import uuid
from pathlib import Path

import docker
from docker.errors import APIError, NotFound
from docker.models.containers import Container

from nanogrid_celery.common.identity import ProcessIdentity
from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import DOCKER_ERRORS, ContainerStartFailed, wrap
from nanogrid_celery.sandbox.cgroups import ContainerCgroup
from nanogrid_celery.sandbox.envs import env_mount
from nanogrid_celery.sandbox.executors import Executor
from nanogrid_celery.sandbox.lease import Lease, LeaseState, ctl_dir
from nanogrid_celery.sandbox.paths import SANDBOX_DIR
from nanogrid_celery.sandbox.scratch import (
    SANDBOX_MOUNT,
    SHM_MOUNT,
    TMP_MOUNT,
    scratch_sizes,
    tmpfs_data,
)

log = get_logger(__name__)

LABEL = "nanogrid"
DIR_LABEL = f"{LABEL}.dir"  # the lease directory, for cleanup (no bind mount names it)


def owner_labels(settings: Settings) -> dict[str, str]:
    me = ProcessIdentity.current()
    return {
        LABEL: "1",
        f"{LABEL}.instance": settings.instance,
        f"{LABEL}.host": me.host,
        f"{LABEL}.pid": str(me.pid),
        f"{LABEL}.pstart": me.start,
    }


def _remove_lease_dirs(host_dir: Path | str) -> None:
    shutil.rmtree(host_dir, ignore_errors=True)
    shutil.rmtree(ctl_dir(Path(host_dir)), ignore_errors=True)


def create_kwargs(
    settings: Settings, executor: Executor, runtime: str, host_dir: Path, role: str
) -> dict:
    lim = settings.limits
    memory = lim.default_memory_mb * 1024 * 1024
    sizes = scratch_sizes(memory)
    labels = owner_labels(settings) | {f"{LABEL}.runtime": runtime, f"{LABEL}.role": role}
    labels[DIR_LABEL] = str(host_dir)
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
            "/tmp": f"rw,exec,nosuid,nodev,{tmpfs_data(sizes[TMP_MOUNT])},mode=1777",
            SANDBOX_DIR: f"rw,exec,nosuid,nodev,{tmpfs_data(sizes[SANDBOX_MOUNT])},mode=0755",
        },
        "shm_size": sizes[SHM_MOUNT],
        "volumes": {},
        "working_dir": SANDBOX_DIR,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "pids_limit": lim.pids,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": int(lim.cpus * 1e9),
        "environment": {"HOME": "/tmp", "LANG": "C.UTF-8"},
    }
    kwargs["volumes"].update(env_mount(settings, runtime))  # requirements envs, read-only
    extra = executor.container_options(host_dir)
    kwargs["volumes"].update(extra.pop("volumes", {}))
    kwargs.update(extra)
    return kwargs


def create_container(
    settings: Settings,
    client: docker.DockerClient,
    executor: Executor,
    runtime: str,
    role: str = "pool",
) -> Lease:
    """Create and start one hardened container with its own (empty) lease directory.

    Raises :class:`ContainerStartFailed` (an InternalError: the run is retried on
    another container) for anything Docker or the host refuses, and when the
    executor's keeper does not come up; nothing is left behind either way.
    """
    base = Path(settings.work_root) / settings.instance
    host_dir = base / uuid.uuid4().hex
    with wrap(ContainerStartFailed, "could not create a container"):
        host_dir.mkdir(parents=True, mode=0o700)
        host_dir.chmod(0o700)
        kwargs = create_kwargs(settings, executor, runtime, host_dir, role)
        try:
            executor.prepare_host(host_dir)
            container = client.containers.run(**kwargs)
            container.reload()
        except Exception:
            _remove_lease_dirs(host_dir)
            raise
        (host_dir / "container").write_text(container.id)
        init_pid = int(container.attrs["State"]["Pid"])
        cgroup = ContainerCgroup(container.id, init_pid)
        keep: set[int] = set()
        for _ in range(100):  # the keeper appears a moment after init
            keep = cgroup.procs()
            if len(keep) >= 2:
                break
            time.sleep(0.005)
    lease = Lease(container, runtime, host_dir, keep, cgroup, init_pid)
    if not executor.wait_ready(lease):
        destroy(lease)
        raise ContainerStartFailed(f"{executor.name} keeper in {lease.short_id} did not come up")
    sizes = scratch_sizes(settings.limits.default_memory_mb * 1024 * 1024)
    try:  # once per container, off the hot path: /dev/shm gets its inode bound (docker sets none)
        lease.in_namespaces(sizes, sweep_ipc=False)
    except Exception as exc:
        destroy(lease)
        raise ContainerStartFailed(f"could not size the scratch mounts: {exc}") from exc
    lease.scratch_sizes = sizes
    return lease


def destroy(lease: Lease) -> None:
    """Remove the container and its lease directory; never raises."""
    lease.to(LeaseState.DISCARDED)
    with contextlib.suppress(NotFound, APIError, *DOCKER_ERRORS):
        lease.container.remove(force=True)
    _remove_lease_dirs(lease.host_dir)


def _owner_alive(labels: dict[str, str]) -> bool:
    try:
        pid = int(labels.get(f"{LABEL}.pid", "0"))
    except ValueError:
        return False
    return ProcessIdentity("", pid, labels.get(f"{LABEL}.pstart", "")).alive()


def reap_orphans(settings: Settings, client: docker.DockerClient) -> int:
    """Remove this host's containers whose owning worker process is gone (crash, SIGKILL).

    Sibling processes reap at the same time (prefork children start together), so a
    container may vanish between the list and its inspect: ``ignore_removed``. A Docker
    that cannot be asked is logged, not raised: the runner must start and answer runs
    with ``internal_error`` until Docker is back, and the next start reaps again.
    """
    filters = {
        "label": [
            f"{LABEL}=1",
            f"{LABEL}.instance={settings.instance}",
            f"{LABEL}.host={socket.gethostname()}",
        ]
    }
    removed = 0
    try:
        containers = client.containers.list(all=True, filters=filters, ignore_removed=True)
    except DOCKER_ERRORS as exc:
        log.warning("could not look for orphan containers: %s", exc)
        return 0
    for container in containers:
        if _owner_alive(container.labels):
            continue
        removed += _remove_with_dirs(container)
    if removed:
        log.info("reaped orphan containers", count=removed)
    return removed


def count_host_containers(client: docker.DockerClient) -> int:
    """How many NanoGrid containers run on this host, every instance and process included.

    ``sparse``: one ``GET /containers/json``; without it docker-py inspects every container
    too (one HTTP call each), which under ``-P threads`` held the GIL against the task
    threads every few seconds (py-spy: the pool-sizer thread was the second busiest).
    """
    filters = {"label": [f"{LABEL}=1", f"{LABEL}.host={socket.gethostname()}"]}
    try:
        return len(
            client.containers.list(all=True, filters=filters, ignore_removed=True, sparse=True)
        )
    except DOCKER_ERRORS as exc:
        log.warning("could not count this host's containers: %s", exc)
        return 0


def _mounted_dir(container: Container) -> str | None:
    if container.labels.get(DIR_LABEL):
        return container.labels[DIR_LABEL]
    for mount in container.attrs.get("Mounts", []):
        if mount.get("Destination") == SANDBOX_DIR:
            return mount.get("Source")
    return None


def remove_all(client: docker.DockerClient, instance: str | None = None) -> int:
    """Remove every NanoGrid container (of one instance, if given): ``nanogrid cleanup``."""
    labels = [f"{LABEL}=1"] + ([f"{LABEL}.instance={instance}"] if instance else [])
    removed = 0
    for container in client.containers.list(
        all=True, filters={"label": labels}, ignore_removed=True
    ):
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
    for container in client.containers.list(all=True, filters=filters, ignore_removed=True):
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
