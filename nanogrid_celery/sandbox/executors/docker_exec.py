"""Run one program inside a leased container, and leave the container as if new.

This is the ``docker exec`` path: portable, ~60-80 ms of exec overhead per
step. A run is: write the code into the lease's host directory (read-only at
``/sandbox`` inside), set this run's limits in the cgroup, optionally compile,
run with a wall-clock deadline and capped output, then :func:`reset`: kill
every process the run left, wipe ``/tmp``, ``/dev/shm`` and the code, restore
default limits, and verify all of it. A container that cannot be verified
clean is never reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.errors import APIError, NotFound

from nanogrid_celery.config import Settings
from nanogrid_celery.execution.runtimes import Plan
from nanogrid_celery.result import InternalError, Status
from nanogrid_celery.sandbox.containers import CODE_DIR, STDIN_PATH, Lease
from nanogrid_celery.sandbox.output import CappedBuffer

log = logging.getLogger(__name__)

SCRATCH_DIRS = ("tmp", "dev/shm")
ENV = {
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
COMPILE_OUTPUT_CAP = 64 * 1024


class SandboxDirty(Exception):
    """The container could not be verified clean; it must be destroyed."""


@dataclass
class RunLimits:
    timeout_ms: int
    memory_bytes: int
    pids: int
    stdout_max_bytes: int
    stderr_max_bytes: int

    def as_dict(self) -> dict[str, int]:
        return {
            "timeout_ms": self.timeout_ms,
            "memory_bytes": self.memory_bytes,
            "memory_mb": self.memory_bytes // (1024 * 1024),
            "pids": self.pids,
            "stdout_max_bytes": self.stdout_max_bytes,
            "stderr_max_bytes": self.stderr_max_bytes,
        }


@dataclass
class Outcome:
    """What happened in the container, before it becomes an ExecutionResult."""

    status: Status
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    stdout: CappedBuffer = field(default_factory=lambda: CappedBuffer(0))
    stderr: CappedBuffer = field(default_factory=lambda: CappedBuffer(0))
    duration_ms: float | None = None
    compile_ms: float | None = None
    peak_memory_bytes: int | None = None
    cpu_time_ms: float | None = None
    memory_limit_bytes: int | None = None


@dataclass
class _Exec:
    exit_code: int | None
    stdout: CappedBuffer
    stderr: CappedBuffer
    timed_out: bool
    duration_ms: float


def write_files(lease: Lease, files: dict[str, bytes], stdin: bytes | None) -> None:
    """Place the request's code where only this lease's container sees it."""
    root = lease.code_dir
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        path.write_bytes(content)
        path.chmod(0o644)
    stdin_file = lease.host_dir / "stdin"
    stdin_file.write_bytes(stdin or b"")
    stdin_file.chmod(0o644)


class ExecSandbox:
    """Runs plans in leased containers through the Docker exec API."""

    def __init__(self, settings: Settings, client: docker.DockerClient) -> None:
        self.settings = settings
        self.client = client

    # -- one run ---------------------------------------------------------------
    def run(
        self,
        lease: Lease,
        plan: Plan,
        files: dict[str, bytes],
        stdin: bytes | None,
        limits: RunLimits,
    ) -> Outcome:
        try:
            write_files(lease, files, stdin)
        except OSError as exc:
            raise InternalError(f"could not stage code for the container: {exc}") from exc
        cg = lease.cgroup
        compile_ms = None
        if plan.compile:
            cg.set_memory_limit(self.settings.limits.compile_memory_mb * 1024 * 1024)
            ooms = cg.oom_kills()
            res = self._exec(
                lease,
                plan.compile,
                self.settings.limits.compile_timeout_ms,
                COMPILE_OUTPUT_CAP,
                COMPILE_OUTPUT_CAP,
                stdin=False,
            )
            compile_ms = res.duration_ms
            failure = self._compile_failure(res, cg.oom_kills() > ooms)
            if failure:
                failure.compile_ms = compile_ms
                return failure
        cg.set_memory_limit(limits.memory_bytes)
        cg.set_pids_limit(limits.pids)
        applied = cg.memory_limit()  # read back: what the kernel enforces, not what we asked
        cg.reset_peak()
        ooms = cg.oom_kills()
        cpu0 = cg.cpu_ns()
        res = self._exec(
            lease,
            plan.run,
            limits.timeout_ms,
            limits.stdout_max_bytes,
            limits.stderr_max_bytes,
            stdin=True,
        )
        cpu1 = cg.cpu_ns()
        oom = cg.oom_kills() > ooms
        outcome = self._classify(res, oom, limits)
        outcome.compile_ms = compile_ms
        outcome.peak_memory_bytes = cg.peak_bytes()
        outcome.memory_limit_bytes = applied
        if cpu0 is not None and cpu1 is not None:
            outcome.cpu_time_ms = round((cpu1 - cpu0) / 1e6, 3)
        return outcome

    @staticmethod
    def _compile_failure(res: _Exec, oom: bool) -> Outcome | None:
        if res.timed_out:
            return Outcome(Status.COMPILE_ERROR, "compilation timed out")
        if oom:
            return Outcome(Status.COMPILE_ERROR, "the compiler ran out of memory")
        if res.exit_code == 0:
            return None
        text = (res.stderr.data + res.stdout.data).decode("utf-8", "replace").strip()
        return Outcome(
            Status.COMPILE_ERROR,
            f"compilation failed (exit {res.exit_code}):\n{text}",
            exit_code=res.exit_code,
            stdout=res.stdout,
            stderr=res.stderr,
        )

    @staticmethod
    def _classify(res: _Exec, oom: bool, limits: RunLimits) -> Outcome:
        out = Outcome(
            Status.SUCCESS,
            exit_code=res.exit_code,
            stdout=res.stdout,
            stderr=res.stderr,
            duration_ms=res.duration_ms,
        )
        code = res.exit_code
        if code is not None and code > 128:
            out.signal = code - 128
        if res.timed_out:
            out.status = Status.TIMEOUT
            out.message = (
                f"wall-clock limit of {limits.timeout_ms} ms exceeded; process tree killed"
            )
        elif oom:
            out.status = Status.OOM
            out.message = f"memory limit of {limits.memory_bytes // (1024 * 1024)} MiB exceeded"
        elif code != 0:
            out.status = Status.ERROR
            if out.signal:
                out.message = f"killed by signal {_signame(out.signal)}"
            else:
                out.message = f"exited with code {code}"
        return out

    # -- docker exec with a deadline --------------------------------------------
    def _exec(
        self,
        lease: Lease,
        argv: list[str],
        timeout_ms: int,
        out_cap: int,
        err_cap: int,
        stdin: bool,
    ) -> _Exec:
        api = self.client.api
        cmd = ["sh", "-c", f'exec "$@" < {STDIN_PATH}', "sh", *argv] if stdin else argv
        try:
            ex = api.exec_create(
                lease.id,
                cmd,
                stdout=True,
                stderr=True,
                user=self.settings.sandbox_user,
                workdir=CODE_DIR,
                environment=ENV,
            )
            started = time.perf_counter()
            stream = api.exec_start(ex["Id"], stream=True, demux=True)
        except (APIError, NotFound) as exc:
            raise InternalError(f"docker exec failed: {exc}") from exc
        out, err = CappedBuffer(out_cap), CappedBuffer(err_cap)
        done = threading.Event()
        ended_at = [0.0]

        def pump() -> None:
            try:
                for o, e in stream:
                    if o:
                        out.write(o)
                    if e:
                        err.write(e)
            except Exception as exc:  # the stream dies when we kill the tree
                log.debug("exec stream ended: %s", exc)
            finally:
                ended_at[0] = time.perf_counter()
                done.set()

        reader = threading.Thread(target=pump, daemon=True, name="exec-pump")
        reader.start()
        timed_out = not done.wait(timeout_ms / 1000)
        if timed_out:
            ended_at[0] = time.perf_counter()
            lease.cgroup.kill_all_except(lease.keep_pids)
            if not done.wait(5):
                with contextlib.suppress(Exception):
                    stream.close()
                raise SandboxDirty("exec stream did not close after killing the process tree")
        exit_code = self._exit_code(ex["Id"])
        if not _container_alive(lease):  # our fault, not the program's: retry elsewhere
            raise InternalError("the container died during the run (removed or Docker restarted)")
        duration = (ended_at[0] - started) * 1000
        return _Exec(exit_code, out, err, timed_out, round(duration, 3))

    def _exit_code(self, exec_id: str) -> int | None:
        for _ in range(200):
            info = self.client.api.exec_inspect(exec_id)
            if not info.get("Running"):
                return info.get("ExitCode")
            time.sleep(0.005)
        return None

    # -- back to pristine ----------------------------------------------------------
    def reset(self, lease: Lease) -> None:
        """Kill leftovers, wipe scratch and code, restore limits; raise SandboxDirty if unsure."""
        cg = lease.cgroup
        try:
            cg.kill_all_except(lease.keep_pids)
            left = cg.procs() - lease.keep_pids
            if left:
                raise SandboxDirty(f"processes survived the kill: {sorted(left)}")
            if not lease.keep_pids <= cg.procs():
                raise SandboxDirty("the container's init or keeper died")
            for rel in SCRATCH_DIRS:
                _empty_dir(lease.root_view / rel)
            _empty_dir(lease.code_dir)
            with contextlib.suppress(FileNotFoundError):
                (lease.host_dir / "stdin").unlink()
            lim = self.settings.limits
            cg.set_memory_limit(lim.default_memory_mb * 1024 * 1024)
            cg.set_pids_limit(lim.pids)
        except SandboxDirty:
            raise
        except OSError as exc:
            raise SandboxDirty(f"reset failed: {exc}") from exc
        for rel in SCRATCH_DIRS:
            if any((lease.root_view / rel).iterdir()):
                raise SandboxDirty(f"/{rel} is not empty after the wipe")
        if any(lease.code_dir.iterdir()):
            raise SandboxDirty("code directory is not empty after the wipe")


def _container_alive(lease: Lease) -> bool:
    """The container's init and keeper still run: a program cannot kill them (root-owned)."""
    try:
        return lease.keep_pids <= lease.cgroup.procs()
    except OSError:
        return False


def _empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` without following links out of it."""
    with os.scandir(path) as entries:
        for entry in entries:
            full = os.path.join(path, entry.name)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(full)
            else:
                os.unlink(full)


def _signame(num: int) -> str:
    import signal as _signal

    try:
        return _signal.Signals(num).name
    except ValueError:
        return str(num)
