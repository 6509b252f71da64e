"""The one keeper thread per process: refreshes what runs, in its context, and nothing else."""

from __future__ import annotations

import contextvars
import threading
import time

from nanogrid_celery.delivery.claim_keeper import ClaimKeeper

request = contextvars.ContextVar("request", default="-")


class FakeClaim:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.seen: list[str] = []


def refresh(claim: FakeClaim) -> None:
    claim.seen.append(request.get())
    if claim.fail:
        raise RuntimeError("redis said no")


def _wait(predicate, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_running_claims_are_refreshed_in_their_own_context_until_discarded() -> None:
    keeper = ClaimKeeper(refresh, interval_s=0.02)
    a, b = FakeClaim("a"), FakeClaim("b")
    token = request.set("req-a")
    keeper.add(a)
    request.reset(token)
    token = request.set("req-b")
    keeper.add(b)
    request.reset(token)
    assert _wait(lambda: len(a.seen) >= 2 and len(b.seen) >= 2)
    assert set(a.seen) == {"req-a"} and set(b.seen) == {"req-b"}  # log lines keep the id
    keeper.discard(a)
    time.sleep(0.03)  # a tick in flight may still see it
    count = len(a.seen)
    assert _wait(lambda: len(b.seen) > count + 2)  # b goes on being refreshed
    assert len(a.seen) == count
    assert len(keeper) == 1


def test_one_thread_serves_every_claim_and_a_failing_refresh_stops_none() -> None:
    before = {t.ident for t in threading.enumerate()}
    keeper = ClaimKeeper(refresh, interval_s=0.02)
    claims = [FakeClaim("bad", fail=True)] + [FakeClaim(str(i)) for i in range(5)]
    for claim in claims:
        keeper.add(claim)
    new = [t for t in threading.enumerate() if t.ident not in before]
    assert [t.name for t in new] == ["claim-keeper"]
    assert _wait(lambda: all(len(c.seen) >= 2 for c in claims))
    for claim in claims:
        keeper.discard(claim)
    assert len(keeper) == 0


def test_nothing_refreshed_before_the_first_interval() -> None:
    keeper = ClaimKeeper(refresh, interval_s=0.5)
    claim = FakeClaim("short")
    keeper.add(claim)
    time.sleep(0.05)  # a python hello is over long before a third of the TTL
    keeper.discard(claim)
    assert claim.seen == []


def test_discard_returns_only_after_a_refresh_in_flight_has_landed() -> None:
    """Else the refresh could land after the release and re-take the claim (_REFRESH)."""
    entered, landed = threading.Event(), threading.Event()

    def slow_refresh(claim: FakeClaim) -> None:
        entered.set()
        time.sleep(0.2)  # a Redis round trip on a very busy host
        landed.set()

    keeper = ClaimKeeper(slow_refresh, interval_s=0.01)
    claim = FakeClaim("slow")
    keeper.add(claim)
    assert entered.wait(2)
    keeper.discard(claim)
    assert landed.is_set()
