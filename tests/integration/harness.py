"""Real workers for integration tests: ``celery -A nanogrid_celery worker`` as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker

from nanogrid_celery import client
from nanogrid_celery.result import ExecutionResult

REPO = Path(__file__).resolve().parents[2]
LOG_DIR = REPO / ".run" / "test-logs"
# How much slower this host is than the machines the waits below were chosen on: 12 in
# make test-cgroup2's emulated (TCG) VMs, where container starts, Python start-up and
# compiles take ~12x longer. Only waits for readiness/results scale, never a limit or
# an assertion on a measured figure.
SLOWDOWN = float(os.environ.get("NANOGRID_TEST_SLOWDOWN", "1"))


class WorkerProcess:
    """One worker with its own queue and instance label, so tests never share containers.

    ``queue`` lets several workers ("hosts") consume one queue; ``instance`` lets a
    replacement take over a dead worker's label scope (and so reap its containers).
    """

    def __init__(
        self,
        name: str,
        concurrency: int = 1,
        pool: str = "prefork",
        include: str | None = None,
        queue: str | None = None,
        instance: str | None = None,
        **env: str | int,
    ) -> None:
        uid = uuid.uuid4().hex[:6]
        self.name = f"{name}-{uid}"
        self.instance = instance or f"{os.environ['NANOGRID_INSTANCE']}-{name}-{uid}"
        self.queue = queue or f"{os.environ['NANOGRID_QUEUE']}-{name}-{uid}"
        self.concurrency = concurrency
        self.pool = pool  # celery's -P: prefork (a pool per child) or threads (one shared pool)
        self.include = include  # extra task modules (celery worker --include), e.g. errbacks
        self.env = {
            **os.environ,
            "NANOGRID_INSTANCE": self.instance,
            "NANOGRID_QUEUE": self.queue,
            **{f"NANOGRID_{k.upper()}": str(v) for k, v in env.items()},
        }
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.docker = docker.from_env()

    @property
    def pool_target(self) -> int:
        if self.env.get("NANOGRID_POOL_ENABLED", "true").lower() in {"0", "false", "no"}:
            return 0
        py = int(self.env.get("NANOGRID_POOL_PYTHON", 2))
        cpp = int(self.env.get("NANOGRID_POOL_CPP", 1))
        processes = self.concurrency if self.pool == "prefork" else 1
        return processes * (py + cpp)

    def start(self, timeout: float = 60) -> WorkerProcess:
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "nanogrid_celery",
                "worker",
                "--loglevel=INFO",
                f"--concurrency={self.concurrency}",
                f"--pool={self.pool}",
                "-n",
                f"{self.name}@%h",
                *([f"--include={self.include}"] if self.include else []),
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout * SLOWDOWN
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_tail()}")
            if "ready." in self.log_path.read_text() and self.paused_count() >= self.pool_target:
                return self
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()  # a worker that never became ready must not outlive the test, nor its pool
        for container in self.containers():
            container.remove(force=True)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{tail}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout * SLOWDOWN)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # -- containers ----------------------------------------------------------------
    def containers(self) -> list:
        return self.docker.containers.list(
            all=True,
            filters={"label": [f"nanogrid.instance={self.instance}"]},
            ignore_removed=True,  # one removed between list and inspect must not fail a test
        )

    def paused_count(self) -> int:
        return sum(1 for c in self.containers() if c.status == "paused")

    def wait_pool_full(self, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout * SLOWDOWN
        while time.monotonic() < deadline:
            if self.paused_count() >= self.pool_target:
                return True
            time.sleep(0.1)
        return False

    # -- submissions -----------------------------------------------------------------
    def submit(self, code, runtime: str = "python", **options):
        return client.submit(code, runtime, queue=self.queue, **options)

    def run(self, code, runtime: str = "python", wait: float = 90, **options) -> ExecutionResult:
        return client.wait(self.submit(code, runtime, **options), timeout=wait * SLOWDOWN)
