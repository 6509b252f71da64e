"""Prometheus metrics of one worker, summed over its prefork processes.

Runs happen in the prefork children and the HTTP endpoint lives in the main
process, so prometheus_client's multiprocess mode joins them: every process
writes its samples to mmap files in ``PROMETHEUS_MULTIPROC_DIR`` and the
endpoint adds them up on each scrape.

The order matters; :mod:`nanogrid_celery.service.lifecycle` keeps it:

1. main process, before the pool forks (:meth:`MetricsServer.prepare`): create a
   private directory and export ``PROMETHEUS_MULTIPROC_DIR``, which the children
   inherit.
2. children: metric objects are created lazily (:func:`_metrics`) - after the
   variable is set, which is when prometheus_client picks its multiprocess
   value class. They count results (:func:`observe`) and sample the pool
   (:class:`PoolSampler`; ``livesum`` gauges, so a child that exits cleanly
   stops counting while its counters stay).
3. main process, once the pool runs (:meth:`MetricsServer.start`): serve
   ``/metrics`` from the directory.
4. at shutdown (:meth:`MetricsServer.stop`): stop serving, remove the directory
   we created.

Only a worker does any of this, and only with ``NANOGRID_METRICS_PORT`` > 0; any
other process that imports the module keeps plain in-process metrics and
creates no files.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

from nanogrid_celery.config import get_settings
from nanogrid_celery.execution.runtimes import RUNTIMES

if TYPE_CHECKING:
    from nanogrid_celery.result import ExecutionResult
    from nanogrid_celery.sandbox.pool import WarmPool

from nanogrid_celery.common.logs import get_logger

log = get_logger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SAMPLE_INTERVAL_S = 5.0
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class Metrics:
    runs: Counter
    starts: Counter
    retries: Counter
    tuned: Counter
    queue_wait: Histogram
    start: Histogram
    compile: Histogram
    run: Histogram
    total: Histogram
    pool: Gauge
    pool_target: Gauge
    pool_resizes: Counter


def _create() -> Metrics:
    # The value class (in-process or mmap files) is chosen from the environment when
    # prometheus_client is imported; choose again now that worker_init may have set it.
    values.ValueClass = values.get_value_class()
    return Metrics(
        runs=Counter("nanogrid_runs", "Finished runs.", ["runtime", "status"]),
        starts=Counter(
            "nanogrid_container_starts",
            "Containers handed to runs: warm (pool) or cold.",
            ["runtime", "start"],
        ),
        retries=Counter(
            "nanogrid_run_retries", "Extra attempts (fresh container or new limits).", ["runtime"]
        ),
        tuned=Counter(
            "nanogrid_tuner_adjustments", "Runs whose memory limit the auto-tuner set.", ["runtime"]
        ),
        queue_wait=Histogram(
            "nanogrid_queue_wait_seconds",
            "Submitted to received by a worker.",
            ["runtime"],
            buckets=_LATENCY,
        ),
        start=Histogram(
            "nanogrid_container_start_seconds",
            "Getting a container: unpause from the pool (warm) or create (cold).",
            ["runtime", "start"],
            buckets=_LATENCY,
        ),
        compile=Histogram(
            "nanogrid_compile_seconds", "Compile step (cpp).", ["runtime"], buckets=_LATENCY
        ),
        run=Histogram(
            "nanogrid_run_seconds", "The user's program, wall clock.", ["runtime"], buckets=_LATENCY
        ),
        total=Histogram(
            "nanogrid_request_seconds",
            "Received to result, in the worker.",
            ["runtime"],
            buckets=_LATENCY,
        ),
        pool=Gauge(
            "nanogrid_pool_containers",
            "Pool containers by state: idle (paused, ready), busy (leased), starting (created).",
            ["runtime", "state"],
            multiprocess_mode="livesum",
        ),
        pool_target=Gauge(
            "nanogrid_pool_target",
            "Containers the pools keep warm (sized to recent demand, see sandbox/demand.py).",
            ["runtime"],
            multiprocess_mode="livesum",
        ),
        pool_resizes=Counter(
            "nanogrid_pool_resizes",
            "Containers the pools grew by (demand) or shrank by (idle TTL).",
            ["runtime", "direction"],
        ),
    )


_lock = threading.Lock()
_instance: Metrics | None = None


def _metrics() -> Metrics:
    global _instance
    with _lock:
        if _instance is None:
            _instance = _create()
        return _instance


def _runtime_label(runtime: Any) -> str:
    """Known runtimes only: a rejected run's runtime is user input (unbounded label values)."""
    return runtime if runtime in RUNTIMES else "other"


def _seconds(ms: Any) -> float | None:
    return ms / 1000 if isinstance(ms, int | float) and ms >= 0 else None


def observe(result: ExecutionResult) -> None:
    """Count one final result and record its latencies."""
    m = _metrics()
    rt = _runtime_label(result.runtime)
    m.runs.labels(rt, str(result.status)).inc()
    start = result.start if result.start in ("warm", "cold") else None
    if start:
        m.starts.labels(rt, start).inc()
    attempts = getattr(result, "attempts", 1) or 1
    if attempts > 1:
        m.retries.labels(rt).inc(attempts - 1)
    if getattr(result, "memory_tuned", False):  # set by the tuner middleware, when on
        m.tuned.labels(rt).inc()
    for hist, ms, labels in (
        (m.queue_wait, result.queue_ms, (rt,)),
        (m.start, getattr(result, "start_ms", None), (rt, start)),
        (m.compile, result.compile_ms, (rt,)),
        (m.run, result.duration_ms, (rt,)),
        (m.total, result.total_ms, (rt,)),
    ):
        seconds = _seconds(ms)
        if seconds is not None and None not in labels:
            hist.labels(*labels).observe(seconds)


_resizes_seen: dict[tuple[str, str], int] = {}


def sample_pool(pool: WarmPool) -> None:
    """Copy the pool's current state into the gauges of this process."""
    m = _metrics()
    for rt, figures in pool.stats().items():
        for state in ("idle", "busy", "starting"):
            m.pool.labels(rt, state).set(figures.get(state, 0))
        m.pool_target.labels(rt).set(figures.get("target", 0))
        for direction, key in (("grow", "grown"), ("shrink", "shrunk")):
            seen = _resizes_seen.get((rt, direction), 0)
            now = figures.get(key, 0)
            if now > seen:
                m.pool_resizes.labels(rt, direction).inc(now - seen)
                _resizes_seen[(rt, direction)] = now


class PoolSampler:
    """Samples a process's pool every :data:`SAMPLE_INTERVAL_S`: refills land between runs."""

    def __init__(self, pool: WarmPool, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.pool = pool
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-pool", daemon=True)

    def start(self) -> PoolSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                sample_pool(self.pool)
            except Exception:
                log.debug("pool sample failed", exc_info=True)
            if self._stop.wait(self.interval):
                return


# -- the worker's main process ---------------------------------------------------------------
class MetricsServer:
    """The multiprocess directory and ``/metrics`` endpoint of one worker's main process.

    Driven by :mod:`nanogrid_celery.service.lifecycle` in the order the module doc gives:
    :meth:`prepare` before the pool forks, :meth:`start` once it has, :meth:`stop` at exit.
    """

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.dir: str | None = None
        self._own_dir = False
        self._server: Any = None

    @property
    def enabled(self) -> bool:
        return self.port > 0

    def prepare(self) -> None:
        """Before the pool forks: an empty directory, named in the environment children inherit."""
        if not self.enabled:
            return
        path = os.environ.get(MULTIPROC_ENV)
        if path:  # named by the operator: must be private to this worker; wiped as the docs say
            os.makedirs(path, exist_ok=True)
            for stale in glob.glob(os.path.join(path, "*.db")):
                os.remove(stale)
        else:
            path = tempfile.mkdtemp(prefix="nanogrid-metrics-")
            os.environ[MULTIPROC_ENV] = path
            self._own_dir = True
        self.dir = path

    def start(self) -> bool:
        """Serve the summed samples of every process; False if it cannot (the worker runs on)."""
        if self.dir is None or self._server is not None:
            return self._server is not None
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.dir)
        try:
            self._server, _thread = start_http_server(self.port, addr=self.host, registry=registry)
        except OSError as exc:  # metrics are an observer: the worker runs on without them
            log.error(
                "metrics endpoint could not start",
                host=self.host,
                port=self.port,
                error=str(exc),
            )
            return False
        log.info(
            "metrics endpoint serving",
            url=f"http://{self.host}:{self.port}/metrics",
            dir=self.dir,
        )
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._own_dir and self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


def child_exited(pid: int) -> None:
    """A child leaving: its live gauges (pool) stop counting; its counters stay."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and get_settings().metrics_port > 0:
        multiprocess.mark_process_dead(pid, path)
