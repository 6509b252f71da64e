"""``nanogrid watch`` units: filters, and the follower resuming after a lost connection."""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

from nanogrid_celery.cli import watch


def test_filters_by_status_and_function():
    entry = {"status": "timeout", "function": "f"}
    assert watch.wanted(entry, set(), None)
    assert watch.wanted(entry, {"timeout", "error"}, "f")
    assert not watch.wanted(entry, {"error"}, None)
    assert not watch.wanted(entry, set(), "g")
    assert watch._statuses(["error,timeout", " oom "]) == {"error", "timeout", "oom"}


class FakeRedis:
    def __init__(self, replies: list) -> None:
        self.replies = replies
        self.reads: list[str] = []

    def xrevrange(self, stream, count):
        return [("5-0", {})]

    def xread(self, streams, count, block):
        self.reads.append(next(iter(streams.values())))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        pass


def test_follow_waits_through_empty_replies_and_resumes_after_a_reconnect(monkeypatch):
    monkeypatch.setattr(watch.time, "sleep", lambda s: None)
    first = FakeRedis([None, [("s", [("6-0", {"status": "ok"})])], RedisConnectionError("down")])
    second = FakeRedis([[("s", [("7-0", {"status": "error"})])]])
    clients = iter([first, second])
    notes: list[float] = []
    got = watch.follow(
        "redis://x",
        "s",
        socket_timeout_s=5,
        on_reconnect=lambda exc, wait: notes.append(wait),
        make_client=lambda url, timeout: next(clients),
    )
    assert [next(got)[0], next(got)[0]] == ["6-0", "7-0"]
    assert first.reads == ["5-0", "5-0", "6-0"]  # "$" pinned to the last entry, then advanced
    assert second.reads == ["6-0"]  # resumed after the last entry seen
    assert notes == [0.5]
