"""How many warm containers a pool keeps: sized to recent demand (OpenWhisk's reactive prewarm).

Per runtime a *minimum* (``NANOGRID_POOL_PYTHON`` / ``_CPP``, kept warm always)
and a *maximum* (``NANOGRID_POOL_MAX_PYTHON`` / ``_CPP``). The target is the
peak number of containers leased at once within the last idle TTL
(``NANOGRID_POOL_IDLE_TTL_S``), clamped to [min, max]: a burst that needed 16
containers leaves 16 warm for the next burst, and once nothing has needed
them for the TTL the pool decays back to the minimum. Growth is bounded by a
host-wide cap of containers and of their memory limits, so many worker
processes on one host cannot grow without bound together.

Why: with a fixed size of 2, a ``-P threads -c 16`` worker cold-started 21-26
of every burst of 48 one-second runs, burst after burst, because surplus
containers were destroyed as soon as they were released (create+start
~250-400 ms vs unpause ~12 ms). Prefork children run one task at a time, so
their maximum defaults to the minimum: today's behaviour.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Demand:
    """Recent peak concurrency of one runtime, and the target it implies."""

    minimum: int
    maximum: int
    ttl_s: float
    peak: int = 0
    peak_at: float = field(default_factory=time.monotonic)

    def observe(self, in_use: int, now: float | None = None) -> None:
        """Record how many are leased now; an old peak decays to the present after the TTL."""
        now = time.monotonic() if now is None else now
        if in_use >= self.peak or now - self.peak_at > self.ttl_s:
            self.peak, self.peak_at = in_use, now

    @property
    def target(self) -> int:
        return max(self.minimum, min(self.maximum, self.peak))


class HostBudget:
    """A host-wide cap on containers and their memory, shared by every pool on the host.

    ``count`` returns how many containers this host runs for NanoGrid (a Docker
    label query, ~10-20 ms), so it is only called from the pool's background
    sizer (:meth:`refresh`), never on a run's path: :meth:`allows_more` uses the
    last count plus what this pool added since.
    """

    def __init__(
        self,
        max_containers: int,
        max_memory_bytes: int,
        container_memory_bytes: int,
        count: Callable[[], int],
    ) -> None:
        self.max_containers = max_containers
        self.max_memory_bytes = max_memory_bytes
        self.container_memory_bytes = container_memory_bytes
        self._count = count
        self._known = 0
        self._lock = threading.Lock()

    def refresh(self) -> None:
        n = int(self._count())
        with self._lock:
            self._known = n

    def allows_more(self, extra: int = 1) -> bool:
        """Whether ``extra`` more containers fit; if so they are counted until the next refresh."""
        with self._lock:
            total = self._known + extra
            if self.max_containers > 0 and total > self.max_containers:
                return False
            memory = total * self.container_memory_bytes
            if self.max_memory_bytes > 0 and memory > self.max_memory_bytes:
                return False
            self._known = total
            return True


def host_memory_bytes() -> int:
    """MemTotal of this host (the default memory budget is half of it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
