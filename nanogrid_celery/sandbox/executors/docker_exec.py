"""The ``exec`` executor: each process through the Docker exec API.

Portable and dependency-free, but ``docker exec`` alone costs 55-80 ms per
process (runc exec floor ~55-65 ms; the low-level API is no faster), so it is
the fallback and the benchmark baseline; ``agent`` is the default. The exec
stream has no timeout of its own (the client timeout does not apply to exec
streams), so a reader thread pumps it and the deadline is enforced here: on
expiry every process in the container's pids cgroup but init and the keeper
is SIGKILLed, which also closes the stream.

The kill repeats until the exec is over, not once: ``exec_start`` returns
before runc has put the process in the container's cgroup, and under TCG
emulation (our cgroup v2 VM, ~12x slower) that took longer than a 100 ms
test timeout, so a single sweep found nothing to kill and the program ran on
until the 5 s stream wait gave up (seen on the Debian 13 VM as a burnt
container and a flaky timeout test). Sweeping every 50 ms until the stream
closes catches a late start and a fork racing the sweep alike;
``STOP_GRACE_S`` bounds it for a stream that never closes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import docker

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import DockerUnavailable, InternalError, SandboxDirty, wrap
from nanogrid_celery.sandbox.executors import Step
from nanogrid_celery.sandbox.lease import Lease
from nanogrid_celery.sandbox.outcome import ProcessResult
from nanogrid_celery.sandbox.output import CappedBuffer
from nanogrid_celery.sandbox.paths import CODE_DIR, ENV, STDIN_PATH
from nanogrid_celery.sandbox.reset import container_alive

log = get_logger(__name__)

STOP_GRACE_S = 15.0  # how long a timed-out exec may take to be over (TCG starts late)
SWEEP_EVERY_S = 0.05


def _shell(step: Step) -> str:
    """The exec'd shell applies the run's rlimits (soft = hard), then becomes the program."""
    lim = step.rlimits or {}
    ulimits = []
    if "nofile" in lim:
        ulimits.append(f"ulimit -n {lim['nofile']}")
    if "fsize" in lim:
        ulimits.append(f"ulimit -f {lim['fsize'] // 512}")  # 512-byte blocks
    if "stack" in lim:
        ulimits.append(f"ulimit -s {lim['stack'] // 1024}")  # KiB
    redirect = f" < {STDIN_PATH}" if step.stdin else ""
    return " && ".join([*ulimits, f'exec "$@"{redirect}'])


class DockerExecExecutor:
    """Starts each process with ``docker exec`` as the sandbox user."""

    name = "exec"
    keeps_spares = False

    def __init__(self, settings: Settings, client: docker.DockerClient) -> None:
        self.settings = settings
        self.client = client

    def container_options(self, host_dir: Path) -> dict[str, Any]:
        return {}  # the keeper is ``sleep infinity``: nothing else runs in the container

    def prepare_host(self, host_dir: Path) -> None:
        return None

    def wait_ready(self, lease: Lease) -> bool:
        return True

    def after_reset(self, lease: Lease) -> None:
        return None

    def start(self, lease: Lease, step: Step) -> ProcessResult:
        api = self.client.api
        argv = step.argv
        lease.ipc_maybe = True  # no agent to look: the reset sweeps after every exec run
        cmd = ["sh", "-c", _shell(step), "sh", *argv]
        with wrap(DockerUnavailable, "docker exec failed"):
            ex = api.exec_create(
                lease.id,
                cmd,
                stdout=True,
                stderr=True,
                user=self.settings.sandbox_user,
                workdir=CODE_DIR,
                environment=ENV | step.env if step.env else ENV,
            )
            started = time.perf_counter()
            stream = api.exec_start(ex["Id"], stream=True, demux=True)
        out, err = CappedBuffer(step.stdout_max), CappedBuffer(step.stderr_max)
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
        timed_out = not done.wait(step.timeout_ms / 1000)
        if timed_out:
            ended_at[0] = time.perf_counter()
            if not _stop(lease, done):
                with contextlib.suppress(Exception):
                    stream.close()
                raise SandboxDirty("exec stream did not close after killing the process tree")
        with wrap(DockerUnavailable, "docker exec inspect failed"):
            exit_code = self._exit_code(ex["Id"])
        if not container_alive(lease):  # our fault, not the program's: retry elsewhere
            raise InternalError("the container died during the run (removed or Docker restarted)")
        duration = (ended_at[0] - started) * 1000
        return ProcessResult(exit_code, out, err, timed_out, round(duration, 3))

    def _exit_code(self, exec_id: str) -> int | None:
        for _ in range(200):
            info = self.client.api.exec_inspect(exec_id)
            if not info.get("Running"):
                return info.get("ExitCode")
            time.sleep(0.005)
        return None


def _stop(lease: Lease, done: threading.Event, grace_s: float = STOP_GRACE_S) -> bool:
    """Kill the run's processes until its exec stream has closed; False if it never did."""
    deadline = time.monotonic() + grace_s
    while True:
        lease.cgroup.kill_all_except(lease.keep_pids)
        if done.wait(SWEEP_EVERY_S):
            return True
        if time.monotonic() >= deadline:
            return False
