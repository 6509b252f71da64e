"""Tools for fault tests: private Redis/moto servers, a client for them, worker children.

Fault tests restart or stop services, so they never touch the shared ones on
6379/5000 (other engineers' tests use those): each starts its own server on a
free port, points a worker at it through NANOGRID_* variables, and talks to
it with :class:`IsolatedClient` (a Celery app of its own, since the global
client reads its URLs once, at import).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from nanogrid_celery.client import _package
from nanogrid_celery.config import Settings, get_settings
from nanogrid_celery.delivery.idempotency import CLAIM, STARTS
from nanogrid_celery.execution.storage import ensure_bucket, upload
from nanogrid_celery.result import ExecutionResult

from .harness import LOG_DIR, WorkerProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """A service process on its own port that a test may kill and start again."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{self.name}-{self.port}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 20) -> Server:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env(),
            )
        wait_for(lambda: port_open(self.port), timeout, f"{self.name} on :{self.port}")
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill it (SIGKILL by default: an outage, not a polite shutdown)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)
        wait_for(lambda: not port_open(self.port), 10, f"{self.name} to close :{self.port}")

    def restart(self, down_for: float = 0.5) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


class RedisServer(Server):
    name = "redis"

    def argv(self) -> list[str]:
        binary = shutil.which("redis-server") or "redis-server"
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def moto_command() -> list[str]:
    """The local stack's moto launcher (scripts/moto_server.py), as scripts/services.sh runs it."""
    launcher = Path(__file__).resolve().parents[2] / "scripts" / "moto_server.py"
    return [sys.executable, str(launcher)]


class MotoServer(Server):
    """A private moto; with ``record=True`` it writes every request it gets to a file.

    moto's recorder (``MOTO_ENABLE_RECORDING``) appends each request as it
    arrives, headers and body, so a test can count the SQS calls a worker
    makes (:meth:`sqs_calls`) without wrapping anything in the worker.
    """

    name = "moto"

    def __init__(self, port: int | None = None, record: bool = False) -> None:
        super().__init__(port)
        self.record = record
        self.recording = LOG_DIR / f"{self.name}-{self.port}.requests.jsonl"

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.record:
            env.update(MOTO_ENABLE_RECORDING="true", MOTO_RECORDER_FILEPATH=str(self.recording))
        return env

    def sqs_calls(self, action: str, queue: str) -> int:
        """How many ``action`` calls (e.g. "ReceiveMessage") named the queue ``queue``."""
        return len(self.sqs_requests(action, queue))

    def sqs_requests(self, action: str, queue: str) -> list[str]:
        """The request bodies of the ``action`` calls that named the queue ``queue``."""
        if not self.recording.exists():
            return []
        bodies = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode("utf-8", "replace")
            target = entry.get("headers", {}).get("X-Amz-Target", "")
            named = target == f"AmazonSQS.{action}" or f"Action={action}" in body
            if named and (f'/{queue}"' in body or f"%2F{queue}&" in body + "&"):
                bodies.append(body)
        return bodies

    def argv(self) -> list[str]:
        return [*moto_command(), "-H", "127.0.0.1", "-p", str(self.port)]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def broker_url(self) -> str:
        return f"sqs://test:test@127.0.0.1:{self.port}"


class IsolatedClient:
    """Submit and wait against given URLs without touching the process-wide client."""

    def __init__(self, **overrides: Any) -> None:
        self.settings: Settings = dataclasses.replace(get_settings(), **overrides)
        s = self.settings
        self.app = Celery(f"nanogrid-test-client-{uuid.uuid4().hex[:6]}")
        self.app.conf.update(
            broker_url=s.broker_url,
            result_backend=s.result_backend,
            broker_transport_options={
                "region": s.sqs_region,
                "is_secure": s.sqs_secure,
                "wait_time_seconds": s.sqs_wait_seconds,
                "polling_interval": 0,
                "visibility_timeout": s.visibility_timeout,
            },
            broker_connection_retry_on_startup=True,
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_extended=True,
        )

    def upload(self, code: Any, request_id: str) -> tuple[str, str]:
        bucket = ensure_bucket(self.settings)  # every time: a restarted moto forgets buckets
        name, data = _package(code)
        key = f"submissions/{request_id}/{name}"
        upload(self.settings, key, data, bucket)
        return bucket, key

    def enqueue(self, request_id: str, bucket: str, key: str, queue: str, **options: Any) -> str:
        kwargs = {
            "request_id": request_id,
            "runtime": options.pop("runtime", "python"),
            "s3_bucket": bucket,
            "s3_key": key,
            "submitted_at": time.time(),
            **options,
        }
        self.app.send_task("nanogrid.run_code", kwargs=kwargs, task_id=request_id, queue=queue)
        return request_id

    def submit(self, code: Any, queue: str, **options: Any) -> str:
        request_id = f"req-{uuid.uuid4().hex}"
        bucket, key = self.upload(code, request_id)
        return self.enqueue(request_id, bucket, key, queue, **options)

    def result(self, request_id: str) -> ExecutionResult | None:
        meta = self.app.backend.get_task_meta(request_id)
        if meta.get("status") == "SUCCESS":
            return ExecutionResult.from_dict(meta["result"])
        return None

    def wait(self, request_id: str, timeout: float = 90) -> ExecutionResult:
        """Poll (not pub/sub): the backend's Redis may be restarted while we wait."""
        return wait_for(lambda: self.result(request_id), timeout, f"result of {request_id}", 0.2)

    def close(self) -> None:
        self.app.close()


def redis_client(url: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(url or get_settings().redis_url)


def claim_holder(request_id: str, url: str | None = None) -> str | None:
    raw = redis_client(url).get(CLAIM.format(request_id))
    return raw.decode() if raw else None


def starts(request_id: str, url: str | None = None) -> int:
    return int(redis_client(url).get(STARTS.format(request_id)) or 0)


def started(worker: WorkerProcess, timeout: float = 60) -> WorkerProcess:
    """Start ``worker``; if it does not come up, stop it before failing (never leak one)."""
    try:
        return worker.start(timeout)
    except BaseException:
        worker.stop()
        raise


def leased_container(worker: WorkerProcess, runtime: str = "python") -> Any:
    """The container a run is using: pooled ones rest paused, so the one running (or None)."""
    running = [
        c
        for c in worker.containers()
        if c.status == "running" and c.labels.get("nanogrid.runtime") == runtime
    ]
    return running[0] if len(running) == 1 else None


def child_pids(parent: int) -> list[int]:
    """Pids whose parent is ``parent`` (the prefork children of a worker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return sorted(found)
