"""Work done inside a container's namespaces from the host: tmpfs resizes and the IPC sweep.

A container runs with no capabilities, so neither the program nor the agent
can remount a tmpfs or remove another user's IPC object; the host can, after
entering the container's mount and IPC namespaces. ``setns`` into a mount
namespace is refused to a multi-threaded process (the worker has threads), so
a forked child does it, reports one JSON line on a pipe and exits. Measured
(2 loaded cores): ~4 ms per call from a small process, ~10 ms from a worker
child (the fork dominates), so it is made only when a size changes or a run
may have made IPC objects: the agent counts them (~50 us), so a clean agent
run never pays it; ``exec`` runs always sweep (reset 0.4 -> ~10 ms, against
~120 ms of ``docker exec`` per run).

SysV objects are listed in ``/proc/sysvipc/*`` of the reader's IPC namespace
and removed with ``IPC_RMID`` (root in the host's user namespace owns the
container's IPC namespace); POSIX message queues are the files of the
container's ``/dev/mqueue``. The sweep lists again after removing: what it
cannot verify gone is reported, and the reset destroys the container.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import time

from nanogrid_celery.errors import SandboxDirty
from nanogrid_celery.sandbox.scratch import tmpfs_data

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 2, 4, 8, 32
IPC_RMID = 0
SYSVIPC = ("shm", "msg", "sem")
MQUEUE_DIR = "/dev/mqueue"
HELPER_TIMEOUT_S = 5.0
MOUNT_FLAGS = {  # what each tmpfs was mounted with; a remount must repeat them
    "sandbox": MS_NOSUID | MS_NODEV,
    "tmp": MS_NOSUID | MS_NODEV,
    "dev/shm": MS_NOSUID | MS_NODEV | MS_NOEXEC,
}

_libc = ctypes.CDLL(None, use_errno=True)


def in_container(init_pid: int, resize: dict[str, int] | None, sweep_ipc: bool) -> dict:
    """Resize the given tmpfs mounts (bytes) and/or sweep IPC objects; raise SandboxDirty."""
    try:
        fds = [os.open(f"/proc/{init_pid}/ns/{ns}", os.O_RDONLY) for ns in ("ipc", "mnt")]
    except OSError as exc:
        raise SandboxDirty(f"cannot enter the container's namespaces: {exc}") from exc
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(read_end)
            _child(fds, resize or {}, sweep_ipc, write_end)
        os.close(write_end)
        write_end = -1
        return _collect(pid, read_end)
    finally:
        for fd in (*fds, read_end, write_end):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _collect(pid: int, fd: int) -> dict:
    deadline = time.monotonic() + HELPER_TIMEOUT_S
    data = b""
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise SandboxDirty("the namespace helper did not finish")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    try:
        report = json.loads(data)
    except ValueError as exc:
        raise SandboxDirty(f"the namespace helper failed: {data[:200]!r}") from exc
    if report.get("error"):
        raise SandboxDirty(f"namespace helper: {report['error']}")
    return report


def _child(fds: list[int], resize: dict[str, int], sweep_ipc: bool, out: int) -> None:
    report: dict = {}
    try:
        for fd, kind in zip(fds, (CLONE_NEWIPC, CLONE_NEWNS), strict=True):
            if _libc.setns(fd, kind) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        for mount, size in resize.items():
            data = tmpfs_data(size).encode()
            target = f"/{mount}".encode()
            if _libc.mount(b"none", target, None, MS_REMOUNT | MOUNT_FLAGS[mount], data) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"remount {target.decode()} size {size}: {os.strerror(err)}")
        if sweep_ipc:
            report["removed"] = _sweep()
            left = _list_ipc()
            if left:
                raise OSError(f"IPC objects survived the sweep: {left}")
    except BaseException as exc:
        report["error"] = str(exc)
    try:
        os.write(out, json.dumps(report).encode())
    finally:
        os._exit(0)


def _list_ipc() -> dict[str, list]:
    found: dict[str, list] = {}
    for kind in SYSVIPC:
        with open(f"/proc/sysvipc/{kind}") as fh:
            ids = [int(line.split()[1]) for line in fh.read().splitlines()[1:] if line.strip()]
        if ids:
            found[kind] = ids
    with contextlib.suppress(FileNotFoundError):
        queues = os.listdir(MQUEUE_DIR)
        if queues:
            found["mqueue"] = queues
    return found


def _sweep() -> int:
    removed = 0
    for kind, ids in _list_ipc().items():
        for ident in ids:
            if kind == "mqueue":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(MQUEUE_DIR, ident))
                ok = True
            elif kind == "shm":
                ok = _libc.shmctl(ident, IPC_RMID, None) == 0
            elif kind == "msg":
                ok = _libc.msgctl(ident, IPC_RMID, None) == 0
            else:
                ok = _libc.semctl(ident, 0, IPC_RMID) == 0
            removed += ok
    return removed
