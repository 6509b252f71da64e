"""Issue #7: the Docker daemon restarts under a running worker - a PRIVATE daemon (issue 11).

The test used to SIGTERM the machine's own dockerd, which killed every container on a
developer's machine. Now it starts its own ``dockerd`` (own unix socket, data root,
exec root, pidfile, containerd namespaces, an empty config file; ``--bridge=none``
and ``--iptables=false`` so the host's networking is never touched - our containers
have no network anyway), loads the python runtime image into it from the main daemon
(``docker save | docker load``), points a worker at it with ``DOCKER_HOST`` and
restarts *that* daemon mid-run. The machine's daemon and its containers are never
involved; the private daemon and its directory are removed at the end.

The in-flight run loses its container and agent; the runner waits for the daemon
to come back and retries on a fresh container, the pool rebuilds, and shutdown
still leaves no container behind - including ones whose removal failed while
the daemon was down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.result import Status

from .harness import LOG_DIR, WorkerProcess

pytestmark = pytest.mark.integration


class PrivateDockerd:
    """A dockerd of our own, started and stopped by the test; never the machine's."""

    def __init__(self) -> None:
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            pytest.skip("needs root and a dockerd binary to run a private Docker daemon")
        self.root = Path(tempfile.mkdtemp(prefix="ngdockerd-", dir="/tmp"))  # short socket path
        self.socket = self.root / "docker.sock"
        self.url = f"unix://{self.socket}"
        config = self.root / "daemon.json"
        config.write_text("{}")  # not /etc/docker/daemon.json: it may name the host's sockets
        ns = f"nanogrid-test-{uuid.uuid4().hex[:8]}"
        self.argv = [
            "dockerd",
            f"--host={self.url}",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            f"--config-file={config}",
            f"--containerd-namespace={ns}",
            f"--containerd-plugins-namespace={ns}-plugins",
            "--bridge=none",
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
            "--shutdown-timeout=3",
        ]
        self.proc: subprocess.Popen | None = None
        self.log = LOG_DIR / f"private-dockerd-{ns}.log"

    def start(self, timeout: float = 60) -> float:
        """Start the daemon; seconds until it answers."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self._docker("info").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"private dockerd did not start; see {self.log}")
            time.sleep(0.2)
        return time.monotonic() - started

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> float:
        """SIGTERM the private daemon, start it again; seconds until it answers."""
        t0 = time.monotonic()
        self.stop()
        return self.start() + (time.monotonic() - t0)

    def load_image(self, tag: str) -> None:
        """Copy an image from the machine's daemon (read-only there) into this one."""
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        load = subprocess.run(
            ["docker", "-H", self.url, "load", "-q"], stdin=save.stdout, capture_output=True
        )
        assert save.stdout is not None
        save.stdout.close()
        if save.wait() != 0 or load.returncode != 0:
            pytest.fail(f"could not load {tag}: {load.stderr.decode()[-500:]}")

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=30)

    def cleanup(self) -> None:
        self.stop()
        # the containerd dockerd started for itself exits with it; if dockerd had to be
        # killed it may not have, so stop it by the pid it recorded (ours, never another)
        pid_file = self.root / "exec" / "containerd" / "containerd.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        prefix = str(self.root) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def _docker(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "-H", self.url, *args], capture_output=True)


@pytest.fixture
def private_dockerd() -> Iterator[PrivateDockerd]:
    d = PrivateDockerd()
    try:
        d.start()
        d.load_image(get_settings().python_image)
        yield d
    finally:
        d.cleanup()
    assert not d.root.exists()


def test_docker_daemon_restart_mid_run(private_dockerd):
    host_pid = _host_dockerd_pid()
    w = WorkerProcess("dockerd", concurrency=1, pool_python=1, pool_cpp=0)
    w.env["DOCKER_HOST"] = private_dockerd.url
    w.docker = private_dockerd.client()
    w.start()
    try:
        before = w.run({"main.py": "print('before')"})
        assert before.status == Status.SUCCESS, before
        in_flight = w.submit({"main.py": "import time; time.sleep(4); print('slow done')"})
        time.sleep(1.5)  # the run is inside its container now
        took = private_dockerd.restart()
        result = client.wait(in_flight, timeout=120)
        assert result.status == Status.SUCCESS, result
        assert result.attempts == 2 and result.stdout == "slow done\n"
        assert result.container_id != before.container_id
        for i in range(3):
            after = w.run({"main.py": f"print({i})"})
            assert (after.status, after.stdout) == (Status.SUCCESS, f"{i}\n"), after
        assert w.proc.poll() is None
    finally:
        w.stop()
    assert w.containers() == [], [c.name for c in w.containers()]
    # the machine's own daemon was never involved: same process, still answering
    assert _host_dockerd_pid() == host_pid
    docker.from_env().ping()
    (LOG_DIR / "private-dockerd-restart.json").write_text(json.dumps({"restart_s": took}))


def _host_dockerd_pid() -> str | None:
    pid_file = Path("/var/run/docker.pid")
    return pid_file.read_text().strip() if pid_file.exists() else None
