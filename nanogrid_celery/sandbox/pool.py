"""A warm pool of paused containers per runtime, one pool per worker process.

The pool's resting state is paused (no CPU, no scheduling noise). ``acquire``
unpauses one (~12 ms) instead of creating one (~350 ms); when the pool is empty
it creates one cold. ``release`` puts a clean container back (the sandbox has
already wiped it) and a background thread pauses it once it has been idle for
``pause_grace_ms`` (as OpenWhisk does): back-to-back runs skip both the pause
and the unpause (~25 ms), and an idle pool is still all paused. Anything
suspect is destroyed and replaced in the background so the next request never
pays for it.

:class:`ColdPool` has the same interface with nothing kept warm (a container
per run, destroyed after it: ``NANOGRID_POOL_ENABLED=false``), so the runner
never asks whether a pool exists; :func:`make_pool` picks one. Both take the
sandbox's verified reset as ``reset``: ``release`` resets and keeps a
container (warm) or destroys it (cold); a container whose reset fails is
discarded, never reused.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import docker
from docker.errors import APIError, NotFound

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import DockerUnavailable, wrap
from nanogrid_celery.execution.runtimes import RUNTIMES
from nanogrid_celery.sandbox.containers import (
    count_host_containers,
    create_container,
    destroy,
    reap_orphans,
    remove_owned,
)
from nanogrid_celery.sandbox.demand import Demand, HostBudget, host_memory_bytes
from nanogrid_celery.sandbox.executors import Executor
from nanogrid_celery.sandbox.lease import Lease, LeaseState

Reset = Callable[[Lease], None]

log = get_logger(__name__)


def _pause(lease: Lease, attempts: int = 3) -> None:
    """Pause, retrying the cgroup freezer's transient "unable to freeze" (seen under load)."""
    for attempt in range(attempts):
        try:
            lease.container.pause()
            return
        except APIError as exc:
            if attempt == attempts - 1 or "freeze" not in str(exc):
                raise
            time.sleep(0.05 * (attempt + 1))


class WarmPool:
    """Paused containers per runtime, leased one request at a time; see the module doc."""

    def __init__(
        self,
        settings: Settings,
        client: docker.DockerClient,
        executor: Executor,
        reset: Reset,
        threads: int = 0,
        budget: HostBudget | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.executor = executor
        self.reset = reset
        self.demand = {
            rt: Demand(
                settings.pool_size(rt), settings.pool_max(rt, threads), settings.pool_idle_ttl_s
            )
            for rt in RUNTIMES
        }
        self.budget = budget or default_budget(settings, client)
        self.events: dict[str, dict[str, int]] = {
            rt: dict.fromkeys(("warm", "cold", "grown", "shrunk"), 0) for rt in RUNTIMES
        }
        self._sizer: threading.Thread | None = None
        self._idle: dict[str, deque[Lease]] = {rt: deque() for rt in RUNTIMES}
        self._lock = threading.Lock()
        self._busy: dict[str, Lease] = {}
        self._pending: dict[str, int] = dict.fromkeys(RUNTIMES, 0)
        self._bg = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool")
        self._closed = False
        # pause grace: idle leases still running, by lease id -> when to pause them
        self._cond = threading.Condition(self._lock)
        self._awake: dict[str, float] = {}
        self._pausing: dict[str, int] = dict.fromkeys(RUNTIMES, 0)
        self._pauser: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------
    def start(self, wait_seconds: float = 2.5) -> None:
        """Reap orphans, then fill every runtime in parallel; wait at most ``wait_seconds``.

        Celery kills a child whose init takes over 4 s, so whatever is not ready
        by then keeps filling in the background.
        """
        reap_orphans(self.settings, self.client)
        futures = []
        for runtime in RUNTIMES:
            for _ in range(self.settings.pool_size(runtime)):
                futures.append(self._schedule_fill(runtime))
        wait(futures, timeout=wait_seconds)
        if any(d.maximum > d.minimum for d in self.demand.values()):
            self._sizer = threading.Thread(target=self._size_loop, name="pool-sizer", daemon=True)
            self._sizer.start()
        log.info("warm pool started", **self.sizes())

    def _schedule_fill(self, runtime: str):
        with self._lock:
            self._pending[runtime] += 1
        return self._bg.submit(self._fill_one, runtime)

    def _fill_one(self, runtime: str) -> None:
        lease = None
        try:
            lease = create_container(self.settings, self.client, self.executor, runtime)
            _pause(lease)
            log.info(
                "created container",
                container=lease.short_id,
                runtime=runtime,
                state="paused",
            )
        except Exception as exc:
            log.error("could not create a pool container: %s", exc, runtime=runtime)
            if lease is not None:  # created but not pausable: never leave it running
                destroy(lease)
            return
        finally:
            with self._lock:
                self._pending[runtime] -= 1
        with self._lock:
            if not self._closed and self._count(runtime) < self.demand[runtime].target:
                lease.to(LeaseState.RELEASED)
                self._idle[runtime].append(lease)
                return
        destroy(lease)

    def shutdown(self) -> int:
        """Remove every container this pool owns (idle and leased)."""
        with self._lock:
            self._closed = True
            leases = [le for q in self._idle.values() for le in q] + list(self._busy.values())
            for q in self._idle.values():
                q.clear()
            self._busy.clear()
            self._awake.clear()
            self._cond.notify_all()
        if self._pauser is not None:  # it destroys what it was pausing once it sees _closed
            self._pauser.join(timeout=30)
        self._bg.shutdown(wait=True, cancel_futures=True)
        with ThreadPoolExecutor(max_workers=4) as ex:
            list(ex.map(destroy, leases))
        try:  # anything whose removal failed earlier (daemon restart) still carries our labels
            strays = remove_owned(self.settings, self.client)
        except Exception as exc:  # best effort: shutdown must finish whatever the daemon does
            log.warning("could not sweep this process's containers: %s", exc)
            strays = 0
        log.info("warm pool shut down", removed=len(leases), strays=strays)
        return len(leases) + strays

    # -- leasing ---------------------------------------------------------------
    def acquire(self, runtime: str) -> Lease:
        """An unpaused container for ``runtime``: warm from the pool, else created cold."""
        with wrap(DockerUnavailable, "could not lease a container"):
            return self._acquire(runtime)

    def _acquire(self, runtime: str) -> Lease:
        while True:
            lease, awake = self._take_idle(runtime)
            if lease is None:
                break
            if awake:  # released within the grace period: still running, no unpause
                return self._hand_out(lease, "warm", "acquired running container", quiet=True)
            if not self._or_replace(lease, "unpause", lease.container.unpause):
                continue
            return self._hand_out(lease, "warm", "acquired and unpaused container")
        lease = create_container(self.settings, self.client, self.executor, runtime)
        return self._hand_out(lease, "cold", "pool empty; created container")

    def _hand_out(self, lease: Lease, start: str, message: str, quiet: bool = False) -> Lease:
        """Mark a lease busy, refill behind it, and log how it was obtained.

        ``quiet``: the hot path (a still-running container, released moments ago) logs at
        DEBUG, as does its release: at -c 1 the run's four INFO lines were 4% of the
        pool child's wall time, and "run finished" names the container anyway.
        """
        lease.start = start
        lease.to(LeaseState.ACQUIRED)
        self._mark_busy(lease)
        with self._lock:
            self.events[lease.runtime][start] += 1
            self._observe(lease.runtime)
        self._top_up(lease.runtime)
        (log.debug if quiet else log.info)(
            message,
            container=lease.short_id,
            runtime=lease.runtime,
            start=start,
        )
        return lease

    def _take_idle(self, runtime: str) -> tuple[Lease | None, bool]:
        """(lease, still running): the most recently released running one, else the
        longest-paused one; waits for an in-flight pause rather than create a container."""
        deadline = time.monotonic() + 5
        with self._cond:
            while True:
                idle = self._idle[runtime]
                for lease in reversed(idle):
                    if self._awake.pop(lease.id, None) is not None:
                        idle.remove(lease)
                        return lease, True
                if idle:
                    return idle.popleft(), False
                left = deadline - time.monotonic()
                if not self._pausing[runtime] or left <= 0:
                    return None, False
                self._cond.wait(left)

    def _mark_busy(self, lease: Lease) -> None:
        lease.uses += 1
        with self._lock:
            self._busy[lease.id] = lease

    def release(self, lease: Lease) -> None:
        """Reset a container after its run and keep it; one that fails the reset is replaced."""
        try:
            self.reset(lease)
        except Exception as exc:  # SandboxDirty, or anything else: never reuse it
            self.discard(lease, str(exc))
            return
        self._keep(lease)

    def _keep(self, lease: Lease) -> None:
        """Pause a clean container and return it; surplus or broken ones are destroyed."""
        rt = lease.runtime
        lease.to(LeaseState.RELEASED)
        with self._lock:
            self._busy.pop(lease.id, None)
            full = self._count(rt) >= self.demand[rt].target
            grows = not full and self._count(rt) >= self.demand[rt].minimum
        if not full and grows and not self.budget.allows_more():
            full = True  # host-wide cap reached: this one is not kept
        if full or self._closed:
            self._bg_destroy(lease)
            return
        if self.settings.pause_grace_ms > 0:
            self._release_awake(lease)
            return
        if not self._or_replace(lease, "pause", lease.container.pause):
            return
        with self._lock:
            self._idle[lease.runtime].append(lease)
            size = len(self._idle[lease.runtime])
        log.info(
            "released container back to pool",
            container=lease.short_id,
            runtime=lease.runtime,
            pool_size=size,
        )

    def _release_awake(self, lease: Lease) -> None:
        with self._cond:
            self._idle[lease.runtime].append(lease)
            self._awake[lease.id] = time.monotonic() + self.settings.pause_grace_ms / 1000
            size = len(self._idle[lease.runtime])
            if self._pauser is None:
                self._pauser = threading.Thread(target=self._pause_idle, name="pool-pauser")
                self._pauser.daemon = True
                self._pauser.start()
            self._cond.notify_all()
        log.debug(
            "released container back to pool",
            container=lease.short_id,
            runtime=lease.runtime,
            pool_size=size,
            state="running",
        )

    def _pause_idle(self) -> None:
        """Background: pause every idle container whose grace period is over."""
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = [
                    le for q in self._idle.values() for le in q if self._awake.get(le.id, now) < now
                ]
                if not due:
                    nxt = min(self._awake.values(), default=None)
                    self._cond.wait(None if nxt is None else max(0.001, nxt - now))
                    continue
                for le in due:  # out of the idle queue while pausing: acquire waits for them
                    self._idle[le.runtime].remove(le)
                    del self._awake[le.id]
                    self._pausing[le.runtime] += 1
            for le in due:
                self._pause_one(le)

    def _pause_one(self, lease: Lease) -> None:
        try:
            _pause(lease)
            ok = True
        except (APIError, NotFound) as exc:
            log.warning(
                "pause failed; replacing container",
                container=lease.short_id,
                error=str(exc),
            )
            ok = False
        with self._cond:
            self._pausing[lease.runtime] -= 1
            keep = ok and not self._closed
            if keep:
                self._idle[lease.runtime].append(lease)
            self._cond.notify_all()
        if self._closed:
            destroy(lease)
        elif not ok:
            self._replace(lease)

    def discard(self, lease: Lease, reason: str) -> None:
        """Destroy a container that must not be reused and fill its place in the background."""
        log.warning("discarding container", container=lease.short_id, reason=reason)
        with self._lock:
            self._busy.pop(lease.id, None)
        self._replace(lease)

    def _or_replace(self, lease: Lease, what: str, step: Callable[[], object]) -> bool:
        """Run a Docker step on ``lease``; if Docker refuses, replace the container: False."""
        try:
            step()
            return True
        except (APIError, NotFound) as exc:
            log.warning(
                f"{what} failed; replacing container", container=lease.short_id, error=str(exc)
            )
            self._replace(lease)
            return False

    def _replace(self, lease: Lease) -> None:
        self._bg_destroy(lease)
        self._top_up(lease.runtime)

    def _bg_destroy(self, lease: Lease) -> None:
        if self._closed:
            destroy(lease)
        else:
            self._bg.submit(destroy, lease)

    def _top_up(self, runtime: str) -> None:
        """Keep idle + being-created at the target size, in the background."""
        if self._closed:
            return
        with self._lock:
            missing = self.demand[runtime].minimum - self._count(runtime)
        for _ in range(max(0, missing)):
            self._schedule_fill(runtime)

    # -- sizing to demand (sandbox/demand.py) --------------------------------------------
    def _count(self, runtime: str) -> int:
        """Containers of ``runtime`` this pool holds or is making; call with the lock held."""
        busy = sum(1 for le in self._busy.values() if le.runtime == runtime)
        return len(self._idle[runtime]) + self._pausing[runtime] + self._pending[runtime] + busy

    def _observe(self, runtime: str) -> None:
        """Feed the demand tracker; call with the lock held."""
        busy = sum(1 for le in self._busy.values() if le.runtime == runtime)
        before = self.demand[runtime].target
        self.demand[runtime].observe(busy)
        if self.demand[runtime].target > before:
            self.events[runtime]["grown"] += self.demand[runtime].target - before

    def target(self, runtime: str) -> int:
        return self.demand[runtime].target

    def _size_loop(self) -> None:
        """Background: decay targets after the idle TTL and destroy the idle surplus."""
        interval = max(0.5, min(5.0, self.settings.pool_idle_ttl_s / 4))
        while True:
            try:
                self.budget.refresh()
            except Exception as exc:  # the count is advisory; growth uses the last one
                log.debug("host budget refresh failed: %s", exc)
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(interval)
                if self._closed:
                    return
                surplus: list[Lease] = []
                for rt in RUNTIMES:
                    self._observe(rt)
                    extra = self._count(rt) - self.demand[rt].target
                    while extra > 0 and self._idle[rt]:
                        lease = self._idle[rt].popleft()  # the longest-idle (paused) first
                        self._awake.pop(lease.id, None)
                        surplus.append(lease)
                        extra -= 1
                    if surplus:
                        self.events[rt]["shrunk"] += sum(1 for le in surplus if le.runtime == rt)
            for lease in surplus:
                log.info(
                    "pool shrunk to demand",
                    container=lease.short_id,
                    runtime=lease.runtime,
                    target=self.demand[lease.runtime].target,
                )
                destroy(lease)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per runtime: states, target/min/max and warm/cold/grown/shrunk counts since start."""
        states = self.states()
        with self._lock:
            return {
                rt: {
                    **states[rt],
                    "target": self.demand[rt].target,
                    "min": self.demand[rt].minimum,
                    "max": self.demand[rt].maximum,
                    **self.events[rt],
                }
                for rt in RUNTIMES
            }

    # -- introspection ---------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {rt: len(q) for rt, q in self._idle.items()}

    def states(self) -> dict[str, dict[str, int]]:
        """Per runtime: paused and ready (idle), leased (busy), being created (starting)."""
        with self._lock:
            busy = [le.runtime for le in self._busy.values()]
            return {
                rt: {"idle": len(q), "busy": busy.count(rt), "starting": self._pending[rt]}
                for rt, q in self._idle.items()
            }

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until every runtime is at its target size (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sizes = self.sizes()
            if all(sizes[rt] >= self.demand[rt].minimum for rt in RUNTIMES):
                return True
            time.sleep(0.05)
        return False


class ColdPool:
    """The warm pool's interface with nothing kept: a fresh container per run, destroyed after.

    For ``NANOGRID_POOL_ENABLED=false`` and as the baseline the warm pool is
    measured against (cold start ~310 ms vs ~12 ms unpause here).
    """

    def __init__(
        self,
        settings: Settings,
        client: docker.DockerClient,
        executor: Executor,
        reset: Reset | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.executor = executor
        self._lock = threading.Lock()
        self._busy: dict[str, Lease] = {}

    def start(self) -> None:
        """A replacement for a killed worker child must still reap what that child left."""
        reap_orphans(self.settings, self.client)

    def shutdown(self) -> int:
        with self._lock:
            leases, self._busy = list(self._busy.values()), {}
        for lease in leases:
            destroy(lease)
        return len(leases)

    def acquire(self, runtime: str) -> Lease:
        lease = create_container(self.settings, self.client, self.executor, runtime, role="cold")
        lease.start = "cold"
        lease.uses = 1
        lease.to(LeaseState.ACQUIRED)
        with self._lock:
            self._busy[lease.id] = lease
        return lease

    def release(self, lease: Lease) -> None:
        """Single use: destroyed (nothing to reset, it is never seen again)."""
        self.discard(lease, "single-use container")

    def discard(self, lease: Lease, reason: str) -> None:
        with self._lock:
            self._busy.pop(lease.id, None)
        destroy(lease)

    def sizes(self) -> dict[str, int]:
        return dict.fromkeys(RUNTIMES, 0)

    def states(self) -> dict[str, dict[str, int]]:
        with self._lock:
            busy = [le.runtime for le in self._busy.values()]
        return {rt: {"idle": 0, "busy": busy.count(rt), "starting": 0} for rt in RUNTIMES}

    def wait_ready(self, timeout: float = 10.0) -> bool:
        return True

    def target(self, runtime: str) -> int:
        return 0

    def stats(self) -> dict[str, dict[str, int]]:
        return {rt: {**s, "target": 0, "min": 0, "max": 0} for rt, s in self.states().items()}


def default_budget(settings: Settings, client: docker.DockerClient) -> HostBudget:
    """The host-wide cap from settings, counting this host's NanoGrid containers in Docker."""
    memory = settings.pool_host_max_memory_mb * MB or host_memory_bytes() // 2
    return HostBudget(
        settings.pool_host_max_containers,
        memory,
        settings.limits.default_memory_mb * MB,
        lambda: count_host_containers(client),
    )


def make_pool(
    settings: Settings,
    client: docker.DockerClient,
    executor: Executor,
    reset: Reset,
    threads: int = 0,
) -> WarmPool | ColdPool:
    """The warm pool, or the cold one when ``NANOGRID_POOL_ENABLED`` is off."""
    if not settings.pool_enabled:
        return ColdPool(settings, client, executor, reset)
    return WarmPool(settings, client, executor, reset, threads=threads)
