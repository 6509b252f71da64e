"""Percentiles and per-scenario summaries of benchmark samples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * pct / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def describe(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": _round(percentile(values, 50)),
        "p95": _round(percentile(values, 95)),
        "p99": _round(percentile(values, 99)),
        "min": _round(min(values)) if values else None,
        "max": _round(max(values)) if values else None,
        "mean": _round(sum(values) / len(values)) if values else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class Sample:
    """One run as the client saw it, plus the worker's own accounting."""

    latency_ms: float  # client.run wall time (or enqueue -> result for cached code)
    duration_ms: float | None  # the program's own time (agent: fork/request -> exit)
    total_ms: float | None  # worker: task received -> result ready
    queue_ms: float | None
    start: str | None
    container: str | None
    status: str

    @property
    def overhead_ms(self) -> float:
        return self.latency_ms - (self.duration_ms or 0.0)

    @property
    def worker_overhead_ms(self) -> float | None:
        if self.total_ms is None:
            return None
        return self.total_ms - (self.duration_ms or 0.0)


@dataclass
class ScenarioResult:
    mode: str
    scenario: str
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.status == "ok"]
        worker = [s.worker_overhead_ms for s in ok if s.worker_overhead_ms is not None]
        return {
            "latency_ms": describe([s.latency_ms for s in ok]),
            "overhead_ms": describe([s.overhead_ms for s in ok]),
            "worker_overhead_ms": describe(worker),
            "duration_ms": describe([s.duration_ms for s in ok if s.duration_ms is not None]),
            "queue_ms": describe([s.queue_ms for s in ok if s.queue_ms is not None]),
            "starts": {k: sum(1 for s in ok if s.start == k) for k in {s.start for s in ok}},
            "containers": len({s.container for s in ok}),
            "failures": len(self.samples) - len(ok) + len(self.errors),
        }


@dataclass
class ThroughputResult:
    mode: str
    scenario: str
    concurrency: int
    runs: int
    seconds: float
    latencies_ms: list[float]
    failures: int
    queue_ms: list[float] = field(default_factory=list)  # SQS send -> task start, per run

    @property
    def runs_per_second(self) -> float:
        return round(self.runs / self.seconds, 2) if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "runs": self.runs,
            "seconds": round(self.seconds, 3),
            "runs_per_second": self.runs_per_second,
            "latency_ms": describe(self.latencies_ms),
            "queue_ms": describe(self.queue_ms),
            "failures": self.failures,
        }
