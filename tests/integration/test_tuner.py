"""Issue #5, for real: measured memory/CPU per run, the auto-tuner, results on Redis, the CLI.

One worker for the module, with a small ``tuner_min_runs`` and history and its
own tuner key prefix (removed afterwards). Every test names its own function,
so histories never mix between tests or with earlier test sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import fields

import pytest
import redis

from nanogrid_celery.config import Settings, get_settings
from nanogrid_celery.middleware.tuning import MB, TunerPolicy, recommend
from nanogrid_celery.result import ExecutionResult, Status

from .harness import REPO, SLOWDOWN, WorkerProcess

pytestmark = pytest.mark.integration

MIN_RUNS = 3
HISTORY = 8
TTL = 3600
PREFIX = f"nanogrid:tuner:test-{uuid.uuid4().hex[:8]}"
TUNER_ENV = {
    "tuner_min_runs": MIN_RUNS,
    "tuner_history": HISTORY,
    "tuner_ttl_seconds": TTL,
    "tuner_prefix": PREFIX,
}
# The worker's policy, rebuilt here to check its numbers.
POLICY = TunerPolicy.from_settings(
    Settings(tuner_min_runs=MIN_RUNS, tuner_history=HISTORY, tuner_prefix=PREFIX)
)

GROW = "import sys\nx = b'x' * (int(sys.stdin.read()) * 1024 * 1024)\nprint(len(x) >> 20)\n"
CPP_HOLD_100 = """#include <cstdio>
#include <vector>
int main() {
    std::vector<char> v(100u << 20, 1);
    std::printf("%d\\n", (int)(v.size() >> 20) + v[12345] - 1);
}
"""
BUSY_1S = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0:\n    pass\n"


def hold(mb: int) -> dict[str, str]:
    """A program that touches and holds ``mb`` MiB."""
    return {"main.py": f"x = b'x' * ({mb} * 1024 * 1024)\nprint(len(x) >> 20)\n"}


def fn(name: str) -> str:
    return f"test-{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tw():
    w = WorkerProcess("tuner", concurrency=1, pool_python=1, pool_cpp=1, **TUNER_ENV).start()
    yield w
    w.stop()
    r = redis.Redis.from_url(get_settings().redis_url)
    for key in r.scan_iter(f"{PREFIX}:*"):
        r.delete(key)
    assert w.containers() == [], "worker shutdown left containers behind"


@pytest.fixture(scope="module")
def rdb():
    return redis.Redis.from_url(get_settings().redis_url, decode_responses=True)


def mib(n: int | None) -> float:
    assert n is not None
    return n / MB


# -- metrics ---------------------------------------------------------------------------
@pytest.mark.cgroups
def test_idle_program_peak_under_20mb(tw):
    r = tw.run({"main.py": "pass"}, function=fn("idle"))
    assert r.status == Status.SUCCESS, r
    assert 0 < mib(r.peak_memory_bytes) < 20
    assert r.memory_limit_bytes == get_settings().limits.default_memory_mb * MB


@pytest.mark.cgroups
@pytest.mark.parametrize("size", [10, 100, 200])
def test_python_peak_memory(tw, size):
    r = tw.run(hold(size), function=fn(f"hold{size}"))
    assert r.status == Status.SUCCESS, r
    assert r.stdout == f"{size}\n"
    assert size <= mib(r.peak_memory_bytes) <= size + 30, mib(r.peak_memory_bytes)


@pytest.mark.cgroups
def test_cpp_peak_memory(tw):
    r = tw.run({"main.cpp": CPP_HOLD_100}, "cpp", function=fn("cpp100"))
    assert r.status == Status.SUCCESS, r
    assert r.stdout == "100\n"
    assert 100 <= mib(r.peak_memory_bytes) <= 130, mib(r.peak_memory_bytes)


@pytest.mark.cgroups
def test_cpu_time_of_one_second_busy_loop(tw):
    r = tw.run({"main.py": BUSY_1S}, function=fn("busy"))
    assert r.status == Status.SUCCESS, r
    assert r.cpu_time_ms >= 900, r.cpu_time_ms
    if SLOWDOWN == 1:
        assert r.cpu_time_ms <= 1100, r.cpu_time_ms
    else:
        # cpu_time_ms is all the CPU of the run, start-up included: ~5-20 ms on a real host,
        # 0.1-0.9 s under emulation (make test-cgroup2), where a loaded host's preemption
        # also counts as guest CPU. There the bound is the loop's second plus an empty
        # program's run (the larger of two, measured now), with half of that again for the
        # emulator's noise, and never less than the 0.9 s start-up seen there: one start
        # can differ from the next by that much (Debian 13 VM, exec: 1898 ms for the loop
        # against a single empty run's 480 ms). Counting the loop twice still fails it.
        idle = max(
            tw.run({"main.py": "pass"}, function=fn("busy-base")).cpu_time_ms for _ in range(2)
        )
        limit = 1100 + max(900, 1.5 * idle)
        assert r.cpu_time_ms <= limit, (r.cpu_time_ms, idle)
    assert r.cpu_usage_percent == pytest.approx(100 * r.cpu_time_ms / r.duration_ms, abs=0.1)
    assert 10 < r.cpu_usage_percent <= 110


@pytest.mark.cgroups
def test_oom_detected_without_oomkilled(tw):
    r = tw.run(hold(100), function=fn("oom"), memory_mb=64)
    assert r.status == Status.OOM, r
    assert r.exit_code == 137 and r.attempts == 1  # explicit limit: no tuner retry
    assert r.memory_limit_bytes == 64 * MB and r.memory_tuned is False


# -- the tuner ---------------------------------------------------------------------------
@pytest.mark.cgroups
def test_limit_converges_to_recommendation(tw):
    name = fn("converge")
    results = [tw.run(hold(50), function=name) for _ in range(MIN_RUNS + 2)]
    assert all(r.status == Status.SUCCESS for r in results), results
    first = results[:MIN_RUNS]
    default = get_settings().limits.default_memory_mb * MB
    assert all(r.memory_limit_bytes == default and not r.memory_tuned for r in first)
    assert [r.recommended_memory_mb is None for r in first] == [True] * (MIN_RUNS - 1) + [False]
    expected = recommend([r.peak_memory_bytes for r in first], POLICY)
    assert results[MIN_RUNS - 1].recommended_memory_mb * MB == expected
    for prev, r in zip(results[MIN_RUNS - 1 :], results[MIN_RUNS:], strict=False):
        assert r.memory_tuned is True
        assert r.memory_limit_bytes == prev.recommended_memory_mb * MB
        assert r.limits["memory_bytes"] == r.memory_limit_bytes
    assert 64 <= results[-1].recommended_memory_mb <= 128  # ~54 MiB * 1.5 + 16
    assert all(r.function == name for r in results)


@pytest.mark.cgroups
def test_growth_past_tuned_limit_gets_one_retry(tw):
    name = fn("grow")
    for _ in range(MIN_RUNS):
        r = tw.run({"main.py": GROW}, stdin="20", function=name)
        assert r.status == Status.SUCCESS, r
    tuned_mb = r.recommended_memory_mb
    assert tuned_mb is not None and tuned_mb < 90
    grown = tw.run({"main.py": GROW}, stdin="90", function=name)
    assert grown.status == Status.SUCCESS, grown
    assert grown.stdout == "90\n"
    assert grown.attempts == 2 and grown.memory_tuned is True
    default_mb = get_settings().limits.default_memory_mb  # the retry is never below untuned
    assert (
        grown.memory_limit_bytes == max(min(2 * tuned_mb, POLICY.max_bytes // MB), default_mb) * MB
    )
    # the history learned: the next limit covers the grown program without a retry
    assert grown.recommended_memory_mb * MB >= grown.peak_memory_bytes * POLICY.headroom
    again = tw.run({"main.py": GROW}, stdin="90", function=name)
    assert again.status == Status.SUCCESS and again.attempts == 1, again
    assert again.memory_limit_bytes == grown.recommended_memory_mb * MB


def test_a_name_taught_by_other_code_does_not_limit_the_victim(tw):
    """Issue 11, class 9: runs of a tiny program under a name must not size different code."""
    name = fn("victim")
    for _ in range(MIN_RUNS + 1):
        taught = tw.run({"main.py": "print('tiny')"}, function=name)
        assert taught.status == Status.SUCCESS, taught
    assert taught.memory_tuned and taught.memory_limit_bytes == 64 * MB, taught
    victim = tw.run(hold(200), function=name)
    assert victim.status == Status.SUCCESS and victim.stdout == "200\n", victim
    assert victim.attempts == 1 and victim.memory_tuned is False, victim


def test_same_code_growing_far_past_its_tuned_limit_still_succeeds(tw):
    """An OOM under a learned limit always gets its retry, at least at the untuned limit."""
    name = fn("grow200")
    for _ in range(MIN_RUNS):
        r = tw.run({"main.py": GROW}, stdin="5", function=name)
        assert r.status == Status.SUCCESS, r
    assert r.recommended_memory_mb == 64, r
    grown = tw.run({"main.py": GROW}, stdin="200", function=name)
    assert grown.status == Status.SUCCESS and grown.stdout == "200\n", grown
    assert grown.attempts == 2 and grown.memory_tuned is True


def test_explicit_memory_mb_is_honoured(tw):
    name = fn("explicit")
    for _ in range(MIN_RUNS):
        tw.run(hold(10), function=name)
    r = tw.run(hold(10), function=name, memory_mb=300)
    assert r.status == Status.SUCCESS, r
    assert r.memory_limit_bytes == 300 * MB and r.memory_tuned is False
    assert r.recommended_memory_mb is not None and r.recommended_memory_mb != 300
    tuned = tw.run(hold(10), function=name)
    assert tuned.memory_tuned and tuned.memory_limit_bytes == r.recommended_memory_mb * MB


def test_tuner_keys_are_bounded(tw, rdb):
    name = fn("bounded")
    for _ in range(HISTORY + 2):
        assert tw.run({"main.py": "print(1)"}, function=name).ok
    key = f"{PREFIX}:h:{name}"
    assert rdb.llen(key) == HISTORY
    assert 0 < rdb.ttl(key) <= TTL
    index = f"{PREFIX}:functions"
    assert rdb.zscore(index, name) is not None
    assert 0 < rdb.ttl(index) <= TTL
    assert set(rdb.scan_iter(f"{PREFIX}:h:{name}*")) == {key}


def test_function_defaults_to_content_hash(tw):
    code = {"main.py": f"print('{uuid.uuid4().hex}')"}
    a, b = tw.run(code), tw.run(code)
    other = tw.run({"main.py": "print('something else')"})
    assert a.function and a.function == b.function != other.function


# -- publishing --------------------------------------------------------------------------
def _stream_entry(rdb, request_id: str, timeout: float = 10) -> dict:
    stream = get_settings().events_stream
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _id, entry in rdb.xrevrange(stream, count=500):
            if entry.get("request_id") == request_id:
                return entry
        time.sleep(0.1)
    raise AssertionError(f"{request_id} not on {stream}")


def test_results_on_stream_and_channel(tw, rdb):
    settings = get_settings()
    pubsub = rdb.pubsub()
    pubsub.subscribe(settings.events_channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    name = fn("events")
    result = tw.run(hold(10), function=name)
    assert result.ok, result

    entry = _stream_entry(rdb, result.request_id)
    assert entry["function"] == name and entry["status"] == "success"
    payload = json.loads(entry["result"])
    expected = {f.name for f in fields(ExecutionResult)}
    assert expected <= set(payload), expected - set(payload)
    assert payload["event_version"] == 1 and payload["published_at"] > 0
    assert ExecutionResult.from_dict(payload) == result  # same as the Celery result
    for key in ("peak_memory_bytes", "cpu_time_ms", "memory_limit_bytes", "duration_ms"):
        assert payload[key] is not None, key

    deadline = time.monotonic() + 10
    live = None
    while live is None and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=1)
        if msg and msg["type"] == "message":
            data = json.loads(msg["data"])
            if data["request_id"] == result.request_id:
                live = data
    pubsub.close()
    assert live == payload


def test_rejected_results_are_published_too(tw, rdb):
    r = tw.run({"main.py": "print(1)"}, function=fn("rej"), timeout_ms=10**9)
    assert r.status == Status.REJECTED
    entry = _stream_entry(rdb, r.request_id)
    assert json.loads(entry["result"])["status"] == "rejected"


# -- the CLI -----------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOGRID_TUNER_PREFIX": PREFIX}
    return subprocess.run(
        [sys.executable, "-m", "nanogrid_celery.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_tune_show_recommends_128_to_256_for_100mb(tw):
    name = fn("cli100")
    for _ in range(Settings().tuner_min_runs):  # the CLI's own (default) policy
        assert tw.run(hold(100), function=name).ok

    out = _cli("tune", "show", name, "--json")
    assert out.returncode == 0, out.stderr
    (stats,) = json.loads(out.stdout)
    assert stats["function"] == name and stats["runs"] == Settings().tuner_min_runs
    assert 128 * MB <= stats["recommended_bytes"] <= 256 * MB, stats

    table = _cli("tune", "show", name, "--width", "200")
    assert table.returncode == 0, table.stderr
    assert name in table.stdout and str(stats["recommended_bytes"] // MB) in table.stdout

    every = _cli("tune", "show", "--json")
    assert name in {s["function"] for s in json.loads(every.stdout)}

    watch = _cli("watch", "--last", "200", "--function", name, "--count", "1")
    assert watch.returncode == 0, watch.stderr
    (line,) = watch.stdout.splitlines()
    assert name in line and "success" in line and "peak=" in line

    reset = _cli("tune", "reset", name)
    assert reset.returncode == 0 and "reset" in reset.stdout
    gone = _cli("tune", "show", name, "--json")
    assert gone.returncode == 1 and json.loads(gone.stdout) == []
