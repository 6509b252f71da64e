"""Process identity: a pid with its start time, and a zombie counts as dead (orphan reaping)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from nanogrid_celery.common.identity import ProcessIdentity, process_start_time


def test_a_live_process_is_alive_and_a_reused_pid_is_not() -> None:
    me = ProcessIdentity.current()
    assert me.alive()
    assert not ProcessIdentity(me.host, me.pid, "0").alive(), "another start time: pid reused"
    assert not ProcessIdentity(me.host, 0, "").alive()


def test_a_killed_process_not_yet_reaped_is_dead() -> None:
    """A SIGKILLed worker child is a zombie until reaped; its containers must be reapable."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        who = ProcessIdentity("", child.pid, process_start_time(child.pid))
        assert who.alive()
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while who.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.path.exists(f"/proc/{child.pid}"), "still a zombie: nobody waited for it"
        assert not who.alive()
    finally:
        child.kill()
        child.wait()
