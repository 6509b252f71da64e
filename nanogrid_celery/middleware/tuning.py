"""The auto-tuner: learn each function's memory need from its runs, recommend a limit.

Per function (a content hash of the code, or the name a client passes) Redis
keeps a capped list of the last ``tuner_history`` runs - peak memory, outcome,
applied limit, the content hash of the code that ran - that expires
``tuner_ttl_seconds`` after the last run, plus one sorted set indexing the
functions (trimmed by age and count), so every key the tuner owns is bounded.

A name is the client's choice, so it proves nothing about the code (issue 11,
class 9: runs of a small program under a victim's name taught 64 MiB, and the
victim's 200 MiB program then ended ``oom``). A recommendation is therefore made
only from runs *of the same code* (:func:`peaks_for`): the history stays keyed
by name, so ``nanogrid tune show NAME`` works as before, and runs of other code
under that name can at worst push the victim's runs out of the capped list
(the victim then runs at the default limit: slower to tune, never smaller).

Once ``tuner_min_runs`` runs are known the recommended limit is::

    clamp(round_up(p95(peak) * headroom + floor, step), min, max)

The math is pure functions (unit-tested without Redis); :class:`TunerStore` is
the only part that talks to Redis.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import redis

from nanogrid_celery.config import Settings

MB = 1024 * 1024
MAX_NAME = 200


# -- the math --------------------------------------------------------------------
@dataclass(frozen=True)
class TunerPolicy:
    """The knobs of the recommendation, in bytes."""

    headroom: float = 1.5
    floor_bytes: int = 16 * MB
    step_bytes: int = 32 * MB
    min_bytes: int = 64 * MB
    max_bytes: int = 1024 * MB
    min_runs: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> TunerPolicy:
        """Bounds also respect the limits a task may ask for, so a recommendation is valid."""
        lim = settings.limits
        lo = max(settings.tuner_min_mb, lim.min_memory_mb)
        hi = max(lo, min(settings.tuner_max_mb, lim.max_memory_mb))
        return cls(
            headroom=settings.tuner_headroom,
            floor_bytes=settings.tuner_floor_mb * MB,
            step_bytes=max(1, settings.tuner_step_mb) * MB,
            min_bytes=lo * MB,
            max_bytes=hi * MB,
            min_runs=max(1, settings.tuner_min_runs),
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: always a value that was observed (p95 of 5 runs is the max)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def round_up(value: float, step: int) -> int:
    """The smallest multiple of ``step`` that is >= ``value``."""
    return int(math.ceil(value / step) * step)


def clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))


def recommend(peaks: Sequence[int], policy: TunerPolicy) -> int | None:
    """The memory limit in bytes for the next run, or None until ``min_runs`` are known."""
    if len(peaks) < policy.min_runs:
        return None
    want = percentile(peaks, 95) * policy.headroom + policy.floor_bytes
    return clamp(round_up(want, policy.step_bytes), policy.min_bytes, policy.max_bytes)


def retry_limit(current: int, policy: TunerPolicy, untuned: int | None = None) -> int | None:
    """The one retry after an OOM under a tuned limit; None if it would not be larger.

    Double ``current`` (capped at max), but never less than ``untuned``, the limit the
    run had without the tuner: a tuned limit may cost a retry, never a result (a
    program needing 200 MiB under a tuned 64 MiB would still OOM at 128 MiB).
    """
    doubled = min(current * 2, policy.max_bytes)
    bigger = max(doubled, untuned or 0)
    return bigger if bigger > current else None


# -- the history -----------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """One run as the tuner remembers it (compact keys: thousands of these live in Redis)."""

    peak_bytes: int
    status: str
    limit_bytes: int | None = None
    tuned: bool = False
    ts: float = 0.0
    code: str | None = None  # content hash of the code that ran

    def to_json(self) -> str:
        data = {
            "p": self.peak_bytes,
            "s": self.status,
            "l": self.limit_bytes,
            "t": self.tuned,
            "ts": round(self.ts, 3),
            "h": self.code,
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> RunRecord:
        d = json.loads(raw)
        code = d.get("h")
        return cls(
            int(d["p"]),
            str(d["s"]),
            d.get("l"),
            bool(d.get("t")),
            float(d.get("ts", 0)),
            str(code) if code is not None else None,
        )


def peaks_for(history: Sequence[RunRecord], code: str | None) -> list[int]:
    """Peaks of the runs of exactly this code: what may be learned for it (newest first)."""
    return [r.peak_bytes for r in history if r.code == code]


@dataclass(frozen=True)
class FunctionStats:
    """What ``nanogrid tune show`` prints for one function."""

    function: str
    runs: int
    ooms: int
    p95_peak_bytes: int | None
    max_peak_bytes: int | None
    recommended_bytes: int | None
    current_limit_bytes: int | None
    current_tuned: bool
    last_run: float | None
    code: str | None = None  # the newest run's code hash (the recommendation is for it)
    codes: int = 0  # distinct code hashes seen under this name

    def to_dict(self) -> dict:
        return asdict(self)


def function_id(function: str) -> str:
    """The name as stored: client-chosen names are capped so keys stay small."""
    if len(function) <= MAX_NAME:
        return function
    return "sha256:" + hashlib.sha256(function.encode()).hexdigest()


def stats_for(function: str, history: Sequence[RunRecord], policy: TunerPolicy) -> FunctionStats:
    """Summarise a newest-first history; the recommendation is the one its newest code gets."""
    peaks = [r.peak_bytes for r in history]
    latest = history[0] if history else None
    learned = peaks_for(history, latest.code) if latest else []
    return FunctionStats(
        function=function,
        runs=len(history),
        ooms=sum(1 for r in history if r.status == "oom"),
        p95_peak_bytes=int(percentile(peaks, 95)) if peaks else None,
        max_peak_bytes=max(peaks) if peaks else None,
        recommended_bytes=recommend(learned, policy),
        current_limit_bytes=latest.limit_bytes if latest else None,
        current_tuned=latest.tuned if latest else False,
        last_run=latest.ts if latest else None,
        code=latest.code if latest else None,
        codes=len({r.code for r in history}),
    )


class TunerStore:
    """Bounded per-function run history in Redis."""

    CACHED_FUNCTIONS = 256  # parsed histories a process keeps (50 records each, ~40 KB)

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "nanogrid:tuner",
        history: int = 50,
        ttl_seconds: int = 7 * 86_400,
        max_functions: int = 100_000,
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.history_size = max(1, history)
        self.ttl = max(1, ttl_seconds)
        self.max_functions = max(1, max_functions)
        # key -> (the list's newest raw entry, its whole history parsed): see peaks()
        self._cache: OrderedDict[str, tuple[str, list[RunRecord]]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> TunerStore:
        return cls(
            client,
            settings.tuner_prefix,
            settings.tuner_history,
            settings.tuner_ttl_seconds,
            settings.tuner_max_functions,
        )

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:functions"

    def key(self, function: str) -> str:
        return f"{self.prefix}:h:{function_id(function)}"

    def record(self, function: str, rec: RunRecord) -> None:
        """Append one run; trim the list, refresh its TTL and keep the index bounded."""
        now = rec.ts or time.time()
        key = self.key(function)
        raw = rec.to_json()
        pipe = self.redis.pipeline(transaction=True)
        pipe.lpush(key, raw)
        pipe.lindex(key, 1)  # what ours went on top of: keeps the cached copy exact
        pipe.ltrim(key, 0, self.history_size - 1)
        pipe.expire(key, self.ttl)
        pipe.zadd(self.index_key, {function_id(function): now})
        pipe.zremrangebyscore(self.index_key, "-inf", now - self.ttl)
        pipe.zremrangebyrank(self.index_key, 0, -(self.max_functions + 1))
        pipe.expire(self.index_key, self.ttl)
        below = pipe.execute()[1]
        cached = self._cache.pop(key, None)
        if cached is not None and below == cached[0]:  # MULTI: nobody else pushed in between
            self._remember(key, raw, [rec, *cached[1]][: self.history_size])

    def history(self, function: str) -> list[RunRecord]:
        """Newest first; unreadable entries are skipped rather than poisoning the tuner."""
        return self._parse(self.redis.lrange(self.key(function), 0, -1))

    @staticmethod
    def _parse(raws: Sequence[str]) -> list[RunRecord]:
        out = []
        for raw in raws:
            try:
                out.append(RunRecord.from_json(raw))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def peaks(self, function: str, code: str | None = None) -> list[int]:
        """Peaks of ``function``'s runs of ``code`` only (see :func:`peaks_for`).

        Read before every run, so it is cached per store (i.e. per worker process) and
        revalidated by the list's newest entry: ``LINDEX 0`` (0.13 ms here) instead of
        ``LRANGE`` of 50 entries and 50 JSON parses (0.96 ms, ~10% of a python hello's
        slot at -c 1 under load). Every run pushes one entry, so :meth:`record` updates
        the copy too, when its MULTI shows that nobody else pushed in between; any other
        writer changes the head and the next read fetches the whole list again.
        """
        key = self.key(function)
        cached = self._cache.get(key)
        if cached is not None:
            head = self.redis.lindex(key, 0)
            if head == cached[0]:
                self._cache.move_to_end(key)
                return peaks_for(cached[1], code)
        raws = self.redis.lrange(key, 0, -1)
        history = self._parse(raws)
        if raws and len(history) == len(raws):  # garbage entries: no exact copy to keep
            self._remember(key, raws[0], history)
        else:
            self._cache.pop(key, None)
        return peaks_for(history, code)

    def _remember(self, key: str, head: str, history: list[RunRecord]) -> None:
        self._cache[key] = (head, history)
        self._cache.move_to_end(key)
        while len(self._cache) > self.CACHED_FUNCTIONS:
            self._cache.popitem(last=False)

    def functions(self, limit: int = 1000) -> list[str]:
        """Most recently run first."""
        return list(self.redis.zrevrange(self.index_key, 0, limit - 1))

    def reset(self, function: str) -> bool:
        """Forget a function; True if it had a history."""
        pipe = self.redis.pipeline(transaction=True)
        self._cache.pop(self.key(function), None)
        pipe.delete(self.key(function))
        pipe.zrem(self.index_key, function_id(function))
        deleted, _ = pipe.execute()
        return bool(deleted)
