"""The warm pool with fake containers (no Docker): pause grace, demand sizing, host cap."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from nanogrid_celery.config import Settings
from nanogrid_celery.sandbox import pool as pool_module
from nanogrid_celery.sandbox.demand import Demand, HostBudget
from nanogrid_celery.sandbox.lease import Lease, LeaseState
from nanogrid_celery.sandbox.pool import WarmPool


@dataclass
class FakeContainer:
    calls: list[str] = field(default_factory=list)
    pause_delay: float = 0.0

    def pause(self) -> None:
        time.sleep(self.pause_delay)
        self.calls.append("pause")

    def unpause(self) -> None:
        self.calls.append("unpause")


@dataclass
class FakeLease:
    runtime: str
    container: FakeContainer = field(default_factory=FakeContainer)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    start: str = "warm"
    uses: int = 0
    state: LeaseState = LeaseState.CREATED
    to = Lease.to  # the real life-cycle checks

    @property
    def short_id(self) -> str:
        return self.id[:12]


@pytest.fixture
def make_pool(monkeypatch):
    created: list[FakeLease] = []
    destroyed: list[FakeLease] = []

    def create(settings, client, executor, runtime, role="pool"):
        lease = FakeLease(runtime)
        created.append(lease)
        return lease

    monkeypatch.setattr(pool_module, "create_container", create)
    monkeypatch.setattr(pool_module, "destroy", destroyed.append)
    monkeypatch.setattr(pool_module, "reap_orphans", lambda settings, client: 0)
    pools: list[WarmPool] = []

    def make(grace_ms: int, threads: int = 0, budget=None, **kw) -> WarmPool:
        settings = Settings(pool_python=1, pool_cpp=0, pause_grace_ms=grace_ms, **kw)
        pool = WarmPool(
            settings,
            client=None,
            executor=None,
            reset=lambda lease: None,
            threads=threads,
            budget=budget or HostBudget(0, 0, 0, lambda: 0),
        )
        pool.start()
        assert pool.wait_ready(5)
        pool.created, pool.destroyed = created, destroyed
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def test_release_within_grace_skips_pause_and_unpause(make_pool):
    pool = make_pool(grace_ms=5000)
    lease = pool.acquire("python")
    assert lease.container.calls == ["pause", "unpause"]  # filled paused, then unpaused
    pool.release(lease)
    again = pool.acquire("python")
    assert again is lease and again.start == "warm"
    assert lease.container.calls == ["pause", "unpause"], "no Docker call for a hot container"
    pool.release(again)


def test_idle_container_is_paused_after_the_grace(make_pool):
    pool = make_pool(grace_ms=50)
    lease = pool.acquire("python")
    pool.release(lease)
    deadline = time.monotonic() + 5
    while lease.container.calls.count("pause") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lease.container.calls == ["pause", "unpause", "pause"]
    assert pool.sizes()["python"] == 1
    assert pool.acquire("python") is lease
    assert lease.container.calls[-1] == "unpause"


def test_acquire_waits_for_an_in_flight_pause_instead_of_creating(make_pool):
    pool = make_pool(grace_ms=20)
    lease = pool.acquire("python")
    lease.container.pause_delay = 0.3
    pool.release(lease)
    time.sleep(0.1)  # the pauser has taken it out of the idle queue and is pausing it
    got = pool.acquire("python")
    assert got is lease and len(pool.created) == 1
    assert lease.container.calls[-2:] == ["pause", "unpause"]


def test_zero_grace_pauses_on_release(make_pool):
    pool = make_pool(grace_ms=0)
    lease = pool.acquire("python")
    pool.release(lease)
    assert lease.container.calls == ["pause", "unpause", "pause"]


def test_shutdown_destroys_containers_being_paused(make_pool):
    pool = make_pool(grace_ms=10)
    lease = pool.acquire("python")
    lease.container.pause_delay = 0.3
    pool.release(lease)
    time.sleep(0.1)
    done = threading.Event()
    threading.Thread(target=lambda: (pool.shutdown(), done.set())).start()
    assert done.wait(10)
    assert lease in pool.destroyed


# -- sized to demand ------------------------------------------------------------------
def _burst(pool: WarmPool, n: int) -> list:
    leases = [pool.acquire("python") for _ in range(n)]
    for lease in leases:
        pool.release(lease)
    return leases


def _wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_prefork_pool_stays_at_its_size():
    demand = Demand(minimum=2, maximum=Settings(pool_python=2).pool_max("python"), ttl_s=60)
    demand.observe(16)
    assert demand.target == 2, "a prefork child (no task threads) keeps today's fixed size"


def test_threaded_pool_keeps_what_the_last_burst_needed(make_pool):
    pool = make_pool(grace_ms=10_000, threads=4, pool_idle_ttl_s=60)
    first = _burst(pool, 4)
    assert [le.start for le in first].count("cold") == 3
    assert pool.sizes()["python"] == 4 and pool.target("python") == 4
    second = _burst(pool, 4)
    assert [le.start for le in second].count("cold") == 0, "the second burst is all warm"
    stats = pool.stats()["python"]
    assert (stats["warm"], stats["cold"], stats["max"]) == (5, 3, 4)


def test_threaded_pool_never_grows_past_its_max(make_pool):
    pool = make_pool(grace_ms=10_000, threads=2)
    _burst(pool, 5)
    assert pool.sizes()["python"] == 2
    # surplus containers are destroyed in the pool's background thread
    assert _wait_for(lambda: len(pool.destroyed) == 3), pool.destroyed


def test_idle_pool_decays_to_its_minimum_after_the_ttl(make_pool):
    pool = make_pool(grace_ms=10_000, threads=4, pool_idle_ttl_s=0.5)
    _burst(pool, 4)
    assert pool.sizes()["python"] == 4
    assert _wait_for(lambda: pool.sizes()["python"] == 1), pool.stats()
    assert pool.stats()["python"]["shrunk"] == 3 and pool.target("python") == 1


def test_host_cap_bounds_growth(make_pool):
    live: list[WarmPool] = []  # the host's count, as Docker would report it
    budget = HostBudget(2, 0, 0, count=lambda: len(live[0].created) - len(live[0].destroyed))
    pool = make_pool(grace_ms=10_000, threads=8, budget=budget)
    live.append(pool)
    budget.refresh()
    _burst(pool, 6)
    assert pool.sizes()["python"] <= 2


def test_demand_decay_follows_the_present():
    d = Demand(minimum=1, maximum=10, ttl_s=5)
    d.observe(8, now=100.0)
    d.observe(2, now=103.0)
    assert d.target == 8
    d.observe(2, now=106.0)
    assert d.target == 2
    d.observe(0, now=112.0)
    assert d.target == 1
