"""A private moto server (S3 + SQS) for one benchmark run.

moto is a single Python process: on a shared machine other people's test
bursts saturate it, and its state grows with every test run. A fresh instance
on its own port gives every benchmark the same starting point; the worker and
client processes find it through the NANOGRID_* variables set here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# The local stack's moto (as scripts/services.sh starts it). Not imported from the test
# helpers: importing those builds the app's settings before this moto's URLs are set.
MOTO_LAUNCHER = Path(__file__).resolve().parents[1] / "scripts" / "moto_server.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class PrivateMoto:
    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.log_path = log_dir / f"bench-moto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> PrivateMoto:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(MOTO_LAUNCHER), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto did not start on :{self.port}; see {self.log_path}")
            time.sleep(0.1)
        os.environ["NANOGRID_BROKER_URL"] = f"sqs://test:test@127.0.0.1:{self.port}"
        os.environ["NANOGRID_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
