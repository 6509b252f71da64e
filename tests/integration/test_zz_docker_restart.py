"""Issue #7: the Docker daemon restarts under a running worker (runs last: it kills every
container on the machine, so no other test may be mid-flight).

The in-flight run loses its container and agent; the runner waits for the daemon
to come back and retries on a fresh container, the pool rebuilds, and shutdown
still leaves no container behind - including ones whose removal failed while
the daemon was down.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from nanogrid_celery import client
from nanogrid_celery.result import Status

from .harness import LOG_DIR, REPO, WorkerProcess

pytestmark = pytest.mark.integration


def _dockerd_pid() -> int:
    out = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    if len(pids) != 1:
        pytest.fail(f"expected one dockerd, found {pids}")
    return pids[0]


def _restart_dockerd() -> float:
    """SIGTERM dockerd, start it again with the same command line; seconds until it answers."""
    pid = _dockerd_pid()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    started = time.monotonic()
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    with (LOG_DIR / "dockerd-restart.log").open("ab") as log:
        new = subprocess.Popen(
            [a.decode() for a in argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pid_file = REPO / ".run" / "dockerd.pid"  # scripts/services.sh stops what it recorded
    if pid_file.exists() and pid_file.read_text().strip() == str(pid):
        pid_file.write_text(f"{new.pid}\n")
    deadline = time.monotonic() + 60
    while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("dockerd did not come back within 60 s")
        time.sleep(0.2)
    return time.monotonic() - started


def test_docker_daemon_restart_mid_run():
    w = WorkerProcess("dockerd", concurrency=1, pool_python=1, pool_cpp=1).start()
    try:
        before = w.run({"main.py": "print('before')"})
        assert before.status == Status.SUCCESS, before
        in_flight = w.submit({"main.py": "import time; time.sleep(4); print('slow done')"})
        time.sleep(1.5)  # the run is inside its container now
        _restart_dockerd()
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
