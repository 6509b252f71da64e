"""Issue 13: a run's result POSTed, signed, to its callback_url by the worker.

A real worker with a secret and an allowlist naming one local receiver (an
http.server on 127.0.0.1): the delivery arrives signed, after the result is
stored, and is retried after a 500; an address outside the allowlist and a
private address matched only by a wildcard are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from nanogrid_celery.app import app
from nanogrid_celery.result import Status

from .harness import WorkerProcess
from .test_flower import free_port, wait_for

pytestmark = pytest.mark.integration

SECRET = "test-callback-secret"


class Receiver:
    """Records every POST; answers 500 to the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rid = self.headers.get("X-NanoGrid-Request-Id", "")
                receiver.calls.append(
                    {
                        "headers": dict(self.headers),
                        "body": body,
                        "path": self.path,
                        "result_ready": app.AsyncResult(rid).ready(),
                        "at": time.time(),
                    }
                )
                code = 500 if len(receiver.calls) <= receiver.fail_first else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def worker(receiver: Receiver) -> Iterator[WorkerProcess]:
    w = WorkerProcess(
        "callbacks",
        concurrency=1,
        pool_python=1,
        pool_cpp=0,
        callback_secret=SECRET,
        # one exact receiver, plus a wildcard that must never unlock a private address
        callback_allow=f"127.0.0.1:{receiver.port},127.0.0.2*",
        callback_backoff_s=0.5,
    ).start()
    yield w
    w.stop()
    for c in w.containers():
        c.remove(force=True)


def test_callback_arrives_signed_after_the_result_and_is_retried(worker, receiver):
    result = worker.run({"main.py": "print('hooked')"}, callback_url=receiver.url("/hook?x=1"))
    assert result.status == Status.SUCCESS and result.callback == "queued", result
    wait_for(lambda: len(receiver.calls) >= 2, 30, "the callback and its retry")
    first, second = receiver.calls[:2]
    assert first["headers"]["X-NanoGrid-Delivery"] == second["headers"]["X-NanoGrid-Delivery"]
    assert [first["headers"]["X-NanoGrid-Attempt"], second["headers"]["X-NanoGrid-Attempt"]] == [
        "1",
        "2",
    ]
    assert second["at"] - first["at"] >= 0.4  # backoff
    assert second["path"] == "/hook?x=1"
    headers, body = second["headers"], second["body"]
    expected = hmac.new(
        SECRET.encode(), headers["X-NanoGrid-Timestamp"].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    assert headers["X-NanoGrid-Signature"] == f"sha256={expected}"
    payload = json.loads(body)
    assert payload["request_id"] == result.request_id and payload["stdout"] == "hooked\n"
    assert payload["status"] == "success"
    assert first["result_ready"], "the callback came before the result was stored"
    time.sleep(2)
    assert len(receiver.calls) == 2  # delivered: no more attempts


def test_callbacks_outside_the_allowlist_or_to_private_addresses_are_refused(worker, receiver):
    before = len(receiver.calls)
    other = free_port()
    outside = worker.run({"main.py": "print(1)"}, callback_url=f"http://127.0.0.1:{other}/")
    assert outside.status == Status.SUCCESS
    assert outside.callback.startswith("refused:") and "NANOGRID_CALLBACK_ALLOW" in outside.callback
    scheme = worker.run({"main.py": "print(1)"}, callback_url="file:///etc/passwd")
    assert scheme.callback.startswith("refused:")
    # matched by the wildcard 127.0.0.2* but private: refused when resolved (logged), not sent
    wild = worker.run({"main.py": "print(1)"}, callback_url=f"http://127.0.0.2:{receiver.port}/")
    assert wild.callback == "queued"
    wait_for(lambda: "resolves to non-public 127.0.0.2" in worker.log_path.read_text(), 20, "")
    time.sleep(1)
    assert len(receiver.calls) == before
