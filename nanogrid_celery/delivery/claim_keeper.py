"""One thread per worker process keeps every running claim alive (delivery/idempotency.py).

A claim's TTL must be refreshed every third of it while its run lasts. That was a
thread per run, started and joined around each one: at -c 1 with two clients
(python hello, ~44 runs/s on the 2-core CI host) the start and the join were 5% of
the pool child's wall time per run, because a new thread has to be scheduled before
``start()`` returns and the host is busy. Runs are short and many, so one long-lived
thread per process now refreshes whatever claims are running on each tick; a claim
registered just after a tick is refreshed a third of the TTL later, as before, one
registered just before it a little early, which is harmless.

Each claim is refreshed inside the context it was registered from, so its log lines
keep the request id. :meth:`ClaimKeeper.discard` waits (at most 5 s, as the join of
the thread per run did) for a refresh of that claim in flight: a refresh that landed
after the release would re-take the claim (``_REFRESH`` sets a missing key), and a
request abandoned for redelivery would then look busy until its TTL ran out.

The thread starts on first use, i.e. in the process that runs
(after the prefork fork: a ClaimStore, and so its keeper, is made per process).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

from nanogrid_celery.common.logs import get_logger

log = get_logger(__name__)


class ClaimKeeper:
    """Calls ``refresh(claim)`` for every registered claim every ``interval_s`` seconds."""

    def __init__(self, refresh: Callable[[Any], None], interval_s: float) -> None:
        self._refresh = refresh
        self.interval_s = interval_s
        self._claims: dict[int, tuple[Any, contextvars.Context]] = {}
        self._lock = threading.Lock()
        self._refreshed = threading.Condition(self._lock)  # notified after every refresh
        self._in_flight: Any = None  # the claim being refreshed right now
        self._thread: threading.Thread | None = None

    def add(self, claim: Any) -> None:
        """Keep ``claim`` alive from now until :meth:`discard`."""
        with self._lock:
            self._claims[id(claim)] = (claim, contextvars.copy_context())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="claim-keeper", daemon=True)
                self._thread.start()

    def discard(self, claim: Any) -> None:
        """Stop refreshing ``claim``; returns once no refresh of it is in flight."""
        with self._refreshed:
            self._claims.pop(id(claim), None)
            self._refreshed.wait_for(lambda: self._in_flight is not claim, timeout=5)

    def __len__(self) -> int:
        return len(self._claims)

    def _loop(self) -> None:
        while True:  # lives as long as its process (a daemon thread)
            time.sleep(self.interval_s)
            with self._lock:
                running = list(self._claims.values())
            for claim, context in running:
                with self._lock:
                    if id(claim) not in self._claims:  # finished meanwhile
                        continue
                    self._in_flight = claim
                try:
                    context.run(self._refresh, claim)
                except Exception:  # one claim's trouble never stops the others' refresh
                    log.exception("claim refresh failed")
                finally:
                    with self._refreshed:
                        self._in_flight = None
                        self._refreshed.notify_all()
