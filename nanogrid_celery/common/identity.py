"""Who a process is, across hosts and pid reuse: host name, pid and process start time.

A pid alone is reused by the kernel; with its start time (clock ticks since
boot, from ``/proc/<pid>/stat``) it names one process for the life of the
host. Container labels (orphan reaping) and idempotency claims (dead-owner
take-over) both use this.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


def process_start_time(pid: int) -> str:
    """Start time of ``pid`` in clock ticks since boot; "" if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    start: str

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start_time(pid))

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether this process still runs; only answerable for processes on this host.

        A zombie is dead: a SIGKILLed worker's child keeps its /proc entry (and start
        time) until someone reaps it, which an orphan's new parent may do late.
        """
        if self.pid <= 0 or not Path(f"/proc/{self.pid}").exists():
            return False
        return process_start_time(self.pid) == self.start and not _zombie(self.pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}
