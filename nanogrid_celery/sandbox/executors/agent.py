"""The fast path: run programs through the in-container agent instead of ``docker exec``.

Same interface and semantics as :class:`ExecSandbox` (staging, cgroup limits,
OOM detection, classification and the host-side reset are inherited); only
the step that starts a process differs. Instead of ~60-80 ms of ``docker exec``
it is one Unix-socket round trip to the agent (``guest/agent.py``) listening in
the lease's private control directory, ~1 ms, and Python runs fork from an
already initialised interpreter (the zygote) instead of starting one.
No Docker API call is made per run.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

import docker

from nanogrid_celery.config import Settings
from nanogrid_celery.execution.runtimes import Plan
from nanogrid_celery.result import InternalError
from nanogrid_celery.sandbox.containers import CODE_DIR, STDIN_PATH, Lease, agent_socket
from nanogrid_celery.sandbox.executors.docker_exec import (
    ENV,
    ExecSandbox,
    Outcome,
    RunLimits,
    _Exec,
)
from nanogrid_celery.sandbox.output import CappedBuffer

log = logging.getLogger(__name__)

PYTHON_ARGV = ["python3", "main.py"]  # the plan that the zygote runs in-process
REPLY_GRACE_S = 15.0  # beyond the run's own timeout: kill, drain and reply take this at most
MAX_HEADER = 1 << 16


class AgentProtocolError(InternalError):
    """The agent could not be reached or answered nonsense: the container is not trusted."""


def agent_call(path: Path | str, request: dict, timeout: float) -> tuple[dict, bytes, bytes]:
    """Send one request, return (header, stdout bytes, stderr bytes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as reader:
            line = reader.readline(MAX_HEADER)
            if not line.endswith(b"\n"):
                raise AgentProtocolError("the agent closed the connection without a reply")
            header = json.loads(line)
            sizes = int(header.get("stdout_len", 0)), int(header.get("stderr_len", 0))
            if sizes[0] > request.get("stdout_max", 0) or sizes[1] > request.get("stderr_max", 0):
                raise AgentProtocolError(f"the agent sent more output than the caps: {sizes}")
            out, err = reader.read(sizes[0]), reader.read(sizes[1])
    if (len(out), len(err)) != sizes:
        raise AgentProtocolError("the agent's reply was cut short")
    return header, out, err


def agent_notify(path: Path | str, request: dict) -> bool:
    """Send a request without waiting for its reply (``prepare`` is off the hot path)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
        return True
    except OSError as exc:
        log.debug("agent notify failed: %s", exc)
        return False


def _capped(cap: int, data: bytes, total: int) -> CappedBuffer:
    buf = CappedBuffer(cap)
    buf.data = bytearray(data)
    buf.total = max(total, len(data))
    return buf


class AgentSandbox(ExecSandbox):
    """Runs plans through the lease's agent; everything but process start is ExecSandbox's."""

    def __init__(self, settings: Settings, client: docker.DockerClient) -> None:
        super().__init__(settings, client)
        uid, _, gid = settings.sandbox_user.partition(":")
        self.uid, self.gid = int(uid), int(gid or uid)
        self._step = threading.local()  # per thread: the compile argv of the plan running

    def run(
        self,
        lease: Lease,
        plan: Plan,
        files: dict[str, bytes],
        stdin: bytes | None,
        limits: RunLimits,
    ) -> Outcome:
        self._step.compile_argv = plan.compile  # followed by the run: prepare a spare for it
        try:
            return super().run(lease, plan, files, stdin, limits)
        finally:
            self._step.compile_argv = None

    def reset(self, lease: Lease) -> None:
        """ExecSandbox's verified reset, then let the agent fork the next run's process."""
        super().reset(lease)
        agent_notify(agent_socket(lease.host_dir), {"op": "prepare"})

    def _exec(
        self,
        lease: Lease,
        argv: list[str],
        timeout_ms: int,
        out_cap: int,
        err_cap: int,
        stdin: bool,
    ) -> _Exec:
        zygote = self.settings.agent_zygote and list(argv) == PYTHON_ARGV
        request = {
            "op": "run",
            "argv": list(argv),
            "cwd": CODE_DIR,
            "env": ENV,
            "stdin": STDIN_PATH if stdin else None,
            "timeout_ms": timeout_ms,
            "stdout_max": out_cap,
            "stderr_max": err_cap,
            "uid": self.uid,
            "gid": self.gid,
            "mode": "python" if zygote else "exec",
            "prepare_next": list(argv) == getattr(self._step, "compile_argv", None),
        }
        try:
            header, out, err = agent_call(
                agent_socket(lease.host_dir), request, timeout_ms / 1000 + REPLY_GRACE_S
            )
        except TimeoutError as exc:
            lease.cgroup.kill_all_except(lease.keep_pids)
            raise AgentProtocolError(f"the agent did not answer in time: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise AgentProtocolError(f"agent request failed: {exc}") from exc
        if not header.get("ok"):
            raise AgentProtocolError(f"the agent could not run {argv[0]}: {header.get('error')}")
        if header.get("dirty"):  # leftovers the agent could not kill: the cgroup kill can
            log.warning("agent left processes behind; killing them through the cgroup")
            lease.cgroup.kill_all_except(lease.keep_pids)
        return _Exec(
            exit_code=header.get("exit_code"),
            stdout=_capped(out_cap, out, int(header.get("stdout_total", 0))),
            stderr=_capped(err_cap, err, int(header.get("stderr_total", 0))),
            timed_out=bool(header.get("timed_out")),
            duration_ms=round(int(header["duration_ns"]) / 1e6, 3),
        )

    def ping(self, lease: Lease, timeout: float = 2.0) -> dict:
        """The agent's identity (tests and health checks)."""
        header, _, _ = agent_call(agent_socket(lease.host_dir), {"op": "ping"}, timeout)
        return header


def make_sandbox(settings: Settings, client: docker.DockerClient) -> ExecSandbox:
    """The sandbox ``settings.executor`` names; containers.py creates containers to match."""
    if settings.executor == "agent":
        return AgentSandbox(settings, client)
    if settings.executor == "exec":
        return ExecSandbox(settings, client)
    raise ValueError(f"NANOGRID_EXECUTOR must be 'agent' or 'exec', got {settings.executor!r}")
