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


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name ([0] state, [19] start)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> str:
    """Start time of ``pid`` in clock ticks since boot; "" if there is no such process."""
    fields = _stat(pid)
    return fields[19] if fields else ""


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
        if self.pid <= 0:
            return False
        fields = _stat(self.pid)
        return bool(fields) and fields[19] == self.start and fields[0] not in {"Z", "X"}
