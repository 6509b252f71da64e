"""Result callbacks: allowlist and address rules, signing, retries - no network."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from types import SimpleNamespace

import pytest

from nanogrid_celery.config import Settings
from nanogrid_celery.delivery import callbacks as cb
from nanogrid_celery.result import ExecutionResult, Status


def settings(**kw) -> Settings:
    base = {"callback_secret": "k", "callback_backoff_s": 0.01, "callback_attempts": 3}
    return dataclasses.replace(Settings(), **{**base, **kw})


def test_patterns_and_url_checks():
    pats = cb.parse_patterns("127.0.0.1:8080, *.example.com, [::1]:9000, hooks.internal")
    assert [(p.host, p.port, p.exact) for p in pats] == [
        ("127.0.0.1", 8080, True),
        ("*.example.com", None, False),
        ("::1", 9000, True),
        ("hooks.internal", None, True),
    ]
    assert cb.check_url("http://127.0.0.1:8080/x?y=1", pats).path == "/x?y=1"
    assert cb.check_url("https://a.example.com/", pats).port == 443
    for bad in ("http://127.0.0.1:8081/", "ftp://a.example.com/", "http://u:p@hooks.internal/"):
        with pytest.raises(cb.CallbackRefused):
            cb.check_url(bad, pats)
    assert cb.check_url("http://anything.org/", []).exact is False  # no allowlist: any host


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "100.64.0.1",
        "0.0.0.0",
        "::ffff:10.0.0.1",
        "224.0.0.1",
    ],
)
def test_non_public_addresses_are_refused_unless_named_exactly(address):
    wild = cb.check_url("http://h.example.com/", cb.parse_patterns("*.example.com"))
    with pytest.raises(cb.CallbackRefused):
        cb.resolve(wild, lambda host, port: [address])
    exact = cb.check_url("http://h.example.com/", cb.parse_patterns("h.example.com"))
    assert cb.resolve(exact, lambda host, port: [address]) == address


def test_a_mixed_dns_answer_is_refused_and_a_public_one_is_pinned():
    target = cb.check_url("http://h.example.com/", [])
    with pytest.raises(cb.CallbackRefused):
        cb.resolve(target, lambda h, p: ["93.184.216.34", "127.0.0.1"])
    assert cb.resolve(target, lambda h, p: ["93.184.216.34"]) == "93.184.216.34"


def test_deliver_signs_retries_on_5xx_and_connects_to_the_resolved_address():
    calls = []
    answers = iter([503, OSError("reset"), 204])

    def poster(target, address, body, headers, timeout):
        calls.append((address, headers))
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    lookups = []
    sender = cb.CallbackSender(
        settings(callback_attempts=4),
        resolver=lambda h, p: lookups.append(h) or ["93.184.216.34"],
        poster=poster,
        sleep=lambda s: None,
    )
    job = cb.Delivery("r1", cb.check_url("http://h.example.com/", []), b'{"a":1}', "d1")
    assert sender.deliver(job) is True
    assert len(calls) == 3 and lookups == ["h.example.com"]  # resolved once, reused
    assert {addr for addr, _ in calls} == {"93.184.216.34"}
    headers = calls[-1][1]
    mac = hmac.new(b"k", headers[cb.TIMESTAMP_HEADER].encode() + b'.{"a":1}', hashlib.sha256)
    assert headers[cb.SIGNATURE_HEADER] == "sha256=" + mac.hexdigest()
    assert [h["X-NanoGrid-Attempt"] for _, h in calls] == ["1", "2", "3"]


def test_deliver_stops_on_a_4xx_and_gives_up_after_the_attempts():
    sender = cb.CallbackSender(
        settings(), resolver=lambda h, p: ["93.184.216.34"], poster=lambda *a: 400, sleep=print
    )
    job = cb.Delivery("r1", cb.check_url("http://h.example.com/", []), b"{}", "d")
    assert sender.deliver(job) is False and job.attempt == 1
    sender.poster = lambda *a: 500
    sender.sleep = lambda s: None
    job = cb.Delivery("r2", cb.check_url("http://h.example.com/", []), b"{}", "d")
    assert sender.deliver(job) is False and job.attempt == 3


class FakeSender:
    def __init__(self) -> None:
        self.sent = []

    def submit(self, request_id, target, result) -> None:
        self.sent.append((request_id, target.url, result))


def test_middleware_stamps_the_result_and_sends_only_after_postrun():
    sender = FakeSender()
    mw = cb.CallbackMiddleware(settings(callback_allow="hooks.example.com"), sender)

    def ran(url):
        result = ExecutionResult(request_id="r1", runtime="python", status=Status.SUCCESS)
        ctx = SimpleNamespace(request=SimpleNamespace(callback_url=url))
        mw.after_run(ctx, result)
        return result

    assert ran("https://hooks.example.com/x").callback == "queued"
    assert sender.sent == []  # not before Celery stored the result
    mw.on_postrun(task_id="r1", kwargs={"request_id": "r1"}, retval={"status": "success"})
    assert sender.sent == [("r1", "https://hooks.example.com/x", {"status": "success"})]
    mw.on_postrun(task_id="r1", kwargs={"request_id": "r1"}, retval={"status": "success"})
    assert len(sender.sent) == 1  # a duplicate served from the idempotency record: nothing
    assert ran("https://evil.example.org/").callback.startswith("refused:")
    assert ran(None).callback is None
    off = cb.CallbackMiddleware(settings(callback_secret=""), sender)
    result = ExecutionResult(request_id="r2", runtime="python", status=Status.SUCCESS)
    off.after_run(SimpleNamespace(request=SimpleNamespace(callback_url="https://x.org/")), result)
    assert result.callback.startswith("off:")


def test_post_connects_to_the_checked_address_not_a_new_lookup():
    """The host name is only the Host header: a name that does not resolve still arrives."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["host"] = self.headers["Host"]
            seen["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.handle_request, daemon=True).start()
    target = cb.check_url(f"http://hooks.invalid:{port}/x", [])
    try:
        assert cb.post(target, "127.0.0.1", b"{}", {"Content-Type": "application/json"}, 5) == 204
    finally:
        server.server_close()
    assert seen == {"host": f"hooks.invalid:{port}", "body": b"{}"}
