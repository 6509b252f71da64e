"""Auto-tuner math, the bounded Redis history, the tuner/events middleware (issue #5).

The store tests use the local Redis on db 15 under a per-test key prefix; the
middleware tests drive the hooks directly, with no Docker or Celery.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

import pytest
import redis

from nanogrid_celery.config import Limits, Settings
from nanogrid_celery.execution.runner import RunRequest
from nanogrid_celery.middleware import RunContext, default_middleware
from nanogrid_celery.middleware.result_stream import (
    ResultPublisher,
    ResultStreamMiddleware,
    event_payload,
    parse_entry,
    stream_fields,
)
from nanogrid_celery.middleware.tuner import TunerMiddleware
from nanogrid_celery.middleware.tuning import (
    MB,
    RunRecord,
    TunerPolicy,
    TunerStore,
    clamp,
    function_id,
    percentile,
    recommend,
    retry_limit,
    round_up,
    stats_for,
)
from nanogrid_celery.result import ExecutionResult, Status
from nanogrid_celery.sandbox.limits import RunLimits
from nanogrid_celery.sandbox.outcome import Outcome

REDIS_URL = "redis://127.0.0.1:6379/15"
POLICY = TunerPolicy(
    headroom=1.5, floor_bytes=16 * MB, step_bytes=32 * MB, min_bytes=64 * MB,
    max_bytes=1024 * MB, min_runs=3,
)  # fmt: skip


# -- math --------------------------------------------------------------------------
def test_percentile_is_nearest_rank():
    assert percentile([5], 95) == 5
    assert percentile([1, 2, 3, 4, 5], 95) == 5  # few runs: p95 is the max
    values = list(range(1, 101))
    assert percentile(values, 95) == 95
    assert percentile(values, 50) == 50
    assert percentile(list(reversed(values)), 95) == 95
    with pytest.raises(ValueError):
        percentile([], 95)


def test_round_up_and_clamp():
    assert round_up(1, 32) == 32
    assert round_up(32, 32) == 32
    assert round_up(32.001, 32) == 64
    assert clamp(10, 64, 1024) == 64
    assert clamp(5000, 64, 1024) == 1024
    assert clamp(100, 64, 1024) == 100


def test_recommend_waits_for_min_runs():
    assert recommend([], POLICY) is None
    assert recommend([100 * MB, 100 * MB], POLICY) is None
    assert recommend([100 * MB] * 3, POLICY) is not None


def test_recommend_formula():
    # 104 MiB * 1.5 + 16 = 172 -> rounded up to 192
    assert recommend([104 * MB] * 5, POLICY) == 192 * MB
    # p95 of these 20 values is the 19th smallest: one outlier is ignored
    peaks = [50 * MB] * 18 + [60 * MB, 900 * MB]
    assert recommend(peaks, POLICY) == round_up(60 * MB * 1.5 + 16 * MB, 32 * MB)


def test_recommend_is_clamped():
    assert recommend([1 * MB] * 5, POLICY) == 64 * MB
    assert recommend([2000 * MB] * 5, POLICY) == 1024 * MB


def test_retry_limit_doubles_capped():
    assert retry_limit(128 * MB, POLICY) == 256 * MB
    assert retry_limit(768 * MB, POLICY) == 1024 * MB
    assert retry_limit(1024 * MB, POLICY) is None


def test_policy_from_settings_respects_task_limits():
    s = Settings(
        tuner_min_mb=8, tuner_max_mb=99_999, limits=Limits(min_memory_mb=32, max_memory_mb=512)
    )
    p = TunerPolicy.from_settings(s)
    assert p.min_bytes == 32 * MB and p.max_bytes == 512 * MB
    assert TunerPolicy.from_settings(Settings()).min_runs == Settings().tuner_min_runs


def test_record_roundtrip_and_stats():
    rec = RunRecord(100 * MB, "success", 256 * MB, False, 1234.5)
    assert RunRecord.from_json(rec.to_json()) == rec
    history = [
        RunRecord(110 * MB, "oom", 128 * MB, True, 3.0),
        RunRecord(100 * MB, "success", 256 * MB, False, 2.0),
        RunRecord(90 * MB, "success", 256 * MB, False, 1.0),
    ]
    st = stats_for("f", history, POLICY)
    assert st.runs == 3 and st.ooms == 1
    assert st.p95_peak_bytes == 110 * MB and st.max_peak_bytes == 110 * MB
    assert st.recommended_bytes == recommend([110 * MB, 100 * MB, 90 * MB], POLICY)
    assert st.current_limit_bytes == 128 * MB and st.current_tuned and st.last_run == 3.0
    assert stats_for("f", [], POLICY).recommended_bytes is None


def test_long_function_names_are_hashed():
    assert function_id("short") == "short"
    long = "x" * 5000
    assert function_id(long).startswith("sha256:") and len(function_id(long)) < 100


# -- the Redis store ------------------------------------------------------------------
@pytest.fixture
def rdb():
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no local redis")
    prefix = f"test-tuner-{uuid.uuid4().hex[:8]}"
    yield client, prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_store_history_is_bounded_and_expires(rdb):
    client, prefix = rdb
    store = TunerStore(client, prefix, history=5, ttl_seconds=300, max_functions=3)
    for i in range(12):
        store.record("fn", RunRecord((10 + i) * MB, "success", 256 * MB, False, 1000.0 + i))
    key = store.key("fn")
    assert client.llen(key) == 5
    assert 0 < client.ttl(key) <= 300
    hist = store.history("fn")
    assert [r.peak_bytes // MB for r in hist] == [21, 20, 19, 18, 17]  # newest first
    assert store.peaks("fn") == [r.peak_bytes for r in hist]


def test_store_peaks_cache_follows_own_and_foreign_writes(rdb):
    """The per-process copy read before each run is never stale: ours or anyone's push."""
    client, prefix = rdb
    mine = TunerStore(client, prefix, history=4)
    other = TunerStore(client, prefix, history=4)  # another worker process
    calls: list[str] = []
    real = client.execute_command

    def counting(*args, **kw):
        calls.append(str(args[0]))
        return real(*args, **kw)

    client.execute_command = counting  # type: ignore[method-assign]
    try:
        for i in range(3):
            mine.record("fn", RunRecord((10 + i) * MB, "success", None, False, 1.0 + i, "c"))
        assert mine.peaks("fn", "c") == [12 * MB, 11 * MB, 10 * MB]  # first read: the list
        mine.record("fn", RunRecord(13 * MB, "success", None, False, 5.0, "c"))
        calls.clear()
        assert mine.peaks("fn", "c") == [13 * MB, 12 * MB, 11 * MB, 10 * MB]
        assert calls == ["LINDEX"]  # own push kept the copy exact: one small read
        mine.record("fn", RunRecord(14 * MB, "success", None, False, 6.0, "c"))
        assert mine.peaks("fn", "c") == [14 * MB, 13 * MB, 12 * MB, 11 * MB]  # trimmed to 4
        other.record("fn", RunRecord(99 * MB, "success", None, False, 7.0, "c"))
        mine.record("fn", RunRecord(15 * MB, "success", None, False, 8.0, "c"))
        calls.clear()
        assert mine.peaks("fn", "c") == [15 * MB, 99 * MB, 14 * MB, 13 * MB]
        assert calls == ["LRANGE"]  # a foreign push in between: read whole again
        other.reset("fn")
        assert mine.peaks("fn", "c") == []
        client.lpush(mine.key("fn"), "not json")  # garbage is skipped, never cached as exact
        mine.record("fn", RunRecord(16 * MB, "success", None, False, 9.0, "c"))
        assert mine.peaks("fn", "c") == [16 * MB]
    finally:
        del client.execute_command


def test_store_peaks_cache_is_bounded(rdb):
    client, prefix = rdb
    store = TunerStore(client, prefix)
    store.CACHED_FUNCTIONS = 3
    for i in range(5):
        store.record(f"fn{i}", RunRecord(MB, "success", None, False, 1.0))
        store.peaks(f"fn{i}")
    assert len(store._cache) == 3


def test_store_function_index_is_bounded(rdb):
    client, prefix = rdb
    store = TunerStore(client, prefix, history=5, ttl_seconds=300, max_functions=3)
    now = time.time()
    for i in range(6):
        store.record(f"fn{i}", RunRecord(MB, "success", None, False, now + i))
    assert client.zcard(store.index_key) == 3
    assert store.functions() == ["fn5", "fn4", "fn3"]
    assert 0 < client.ttl(store.index_key) <= 300
    # a function not run for longer than the TTL falls out of the index
    store.record("fresh", RunRecord(MB, "success", None, False, now + 1000))
    assert store.functions() == ["fresh"]


def test_store_reset(rdb):
    client, prefix = rdb
    store = TunerStore(client, prefix)
    store.record("fn", RunRecord(MB, "success", None, False, 1.0))
    assert store.reset("fn") is True
    assert store.history("fn") == [] and "fn" not in store.functions()
    assert store.reset("fn") is False


def test_store_skips_garbage_entries(rdb):
    client, prefix = rdb
    store = TunerStore(client, prefix)
    store.record("fn", RunRecord(MB, "success", None, False, 1.0))
    client.lpush(store.key("fn"), "not json", json.dumps({"nope": 1}))
    assert len(store.history("fn")) == 1


# -- the tuner middleware ---------------------------------------------------------------
def _settings(prefix: str, **kw) -> Settings:
    base = {
        "redis_url": REDIS_URL,
        "tuner_prefix": prefix,
        "tuner_min_runs": 3,
        "tuner_min_mb": 64,
        "tuner_max_mb": 1024,
    }
    return Settings(**(base | kw))


def _ctx(function: str, explicit: bool = False) -> RunContext:
    req = RunRequest("req-1", "python", "b", "k", memory_mb=300 if explicit else None)
    limits = RunLimits(10_000, (300 if explicit else 256) * MB, 128, 1 << 20, 1 << 20)
    result = ExecutionResult("req-1", "python", Status.INTERNAL_ERROR)
    return RunContext(
        req, result, runtime="python", function=function, limits=limits, explicit_memory=explicit
    )


def _rejected_ctx() -> RunContext:
    """A run rejected before its code was fetched: no function, no limits."""
    req = RunRequest("req-x", "python", "b", "k")
    return RunContext(req, ExecutionResult("req-x", "python", Status.REJECTED))


def _result(status: Status, peak: int | None, limit: int) -> ExecutionResult:
    return ExecutionResult(
        "req-1",
        "python",
        status,
        peak_memory_bytes=peak,
        memory_limit_bytes=limit,
        finished_at=1000.0,
    )


def _one_run(mw: TunerMiddleware, function: str, peak: int, explicit: bool = False):
    ctx = _ctx(function, explicit)
    mw.before_run(ctx)
    result = _result(Status.SUCCESS, peak, ctx.limits.memory_bytes)
    mw.after_run(ctx, result)
    return ctx, result


def test_tuner_applies_recommendation_after_min_runs(rdb):
    _client, prefix = rdb
    mw = TunerMiddleware(_settings(prefix))
    for i in range(3):
        ctx, result = _one_run(mw, "fn", 100 * MB)
        assert not ctx.tuned and ctx.limits.memory_bytes == 256 * MB
        assert result.memory_tuned is False
        assert result.recommended_memory_mb == (None if i < 2 else 192)
    ctx, result = _one_run(mw, "fn", 100 * MB)
    assert ctx.tuned and ctx.limits.memory_bytes == 192 * MB
    assert result.memory_tuned is True and result.recommended_memory_mb == 192


def test_tuner_explicit_memory_wins(rdb):
    _client, prefix = rdb
    mw = TunerMiddleware(_settings(prefix))
    for _ in range(3):
        _one_run(mw, "fn", 100 * MB)
    ctx, result = _one_run(mw, "fn", 100 * MB, explicit=True)
    assert not ctx.tuned and ctx.limits.memory_bytes == 300 * MB
    assert result.memory_tuned is False and result.recommended_memory_mb == 192


def test_tuner_retries_oom_once_under_tuned_limit_and_learns(rdb):
    _client, prefix = rdb
    mw = TunerMiddleware(_settings(prefix))
    for _ in range(3):
        _one_run(mw, "fn", 30 * MB)  # -> 30*1.5+16 = 61 -> 64 MiB
    ctx = _ctx("fn")
    mw.before_run(ctx)
    assert ctx.tuned and ctx.limits.memory_bytes == 64 * MB
    oom = Outcome(Status.OOM, peak_memory_bytes=64 * MB)
    retry = mw.retry_limits(ctx, oom)
    assert retry is not None and retry.memory_bytes == 256 * MB  # 2x 64, but >= untuned 256
    ctx.limits = retry
    assert mw.retry_limits(ctx, oom) is None  # only once
    result = _result(Status.SUCCESS, 90 * MB, 128 * MB)
    mw.after_run(ctx, result)
    statuses = [r.status for r in mw.store.history("fn")]
    assert statuses[:2] == ["success", "oom"]
    assert result.recommended_memory_mb * MB >= 90 * MB * 1.5


def test_tuner_does_not_retry_untuned_or_non_oom(rdb):
    _client, prefix = rdb
    mw = TunerMiddleware(_settings(prefix))
    ctx = _ctx("fresh")
    mw.before_run(ctx)
    assert mw.retry_limits(ctx, Outcome(Status.OOM, peak_memory_bytes=256 * MB)) is None
    ctx.tuned = True
    assert mw.retry_limits(ctx, Outcome(Status.ERROR)) is None
    ctx.limits = replace(ctx.limits, memory_bytes=1024 * MB)
    assert mw.retry_limits(ctx, Outcome(Status.OOM)) is None  # already at max


def test_tuner_ignores_runs_without_a_measurement(rdb):
    _client, prefix = rdb
    mw = TunerMiddleware(_settings(prefix))
    ctx = _ctx("fn")
    mw.before_run(ctx)
    mw.after_run(ctx, _result(Status.COMPILE_ERROR, 500 * MB, 256 * MB))
    mw.after_run(ctx, _result(Status.INTERNAL_ERROR, None, 256 * MB))
    mw.after_run(_rejected_ctx(), _result(Status.REJECTED, None, 256 * MB))
    assert mw.store.history("fn") == []


def test_tuner_survives_redis_down():
    mw = TunerMiddleware(_settings("x", redis_url="redis://127.0.0.1:1/0"))
    ctx = _ctx("fn")
    mw.before_run(ctx)
    assert not ctx.tuned and ctx.limits.memory_bytes == 256 * MB
    result = _result(Status.SUCCESS, 10 * MB, 256 * MB)
    mw.after_run(ctx, result)
    assert result.recommended_memory_mb is None


# -- events ---------------------------------------------------------------------------
def test_event_payload_caps_output_and_keeps_fields():
    result = ExecutionResult("req-9", "python", Status.SUCCESS, stdout="a" * 100, stderr="e")
    result.function, result.peak_memory_bytes = "fn", 5 * MB
    payload = event_payload(result, 10)
    assert payload["stdout"] == "a" * 10 and payload["stderr"] == "e"
    assert payload["output_cut"] is True and payload["event_version"] == 1
    assert set(result.to_dict()) <= set(payload)
    fields = stream_fields(payload)
    assert fields["request_id"] == "req-9" and fields["status"] == "success"
    assert fields["function"] == "fn"
    assert parse_entry(fields) == json.loads(json.dumps(payload))
    assert ExecutionResult.from_dict(parse_entry(fields)).peak_memory_bytes == 5 * MB


def test_publisher_writes_stream_and_channel(rdb):
    client, prefix = rdb
    s = Settings(
        redis_url=REDIS_URL,
        events_stream=f"{prefix}:stream",
        events_channel=f"{prefix}:chan",
        events_maxlen=10,
    )
    pubsub = client.pubsub()
    pubsub.subscribe(s.events_channel)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    pub = ResultPublisher(s, client)
    for i in range(30):
        assert pub.publish(ExecutionResult(f"req-{i}", "python", Status.SUCCESS))
    # MAXLEN ~ trims whole macro nodes: bounded, though not exactly 10
    assert client.xlen(s.events_stream) < 30
    _id, fields = client.xrevrange(s.events_stream, count=1)[0]
    assert parse_entry(fields)["request_id"] == "req-29"
    msg = pubsub.get_message(timeout=2)
    assert msg["type"] == "message" and json.loads(msg["data"])["request_id"] == "req-0"
    pubsub.close()


def test_publisher_never_raises_when_redis_is_down():
    s = Settings(redis_url="redis://127.0.0.1:1/0")
    mw = ResultStreamMiddleware(s)
    mw.after_run(_rejected_ctx(), ExecutionResult("req-x", "python", Status.SUCCESS))
    assert mw.publisher.publish(ExecutionResult("req-x", "python", Status.SUCCESS)) is None


def test_default_middleware_order_and_switches():
    names = [type(m).__name__ for m in default_middleware(Settings())]
    after_order = names[::-1]  # Hooks.emit_after runs after-hooks in reverse order
    assert after_order.index("TunerMiddleware") < after_order.index("ResultStreamMiddleware")
    off = Settings(tuner_enabled=False, events_enabled=False)
    off_names = {type(m).__name__ for m in default_middleware(off)}
    assert not off_names & {"TunerMiddleware", "ResultStreamMiddleware"}


# -- issue 11, class 9: a name proves nothing about the code ----------------------------
def _code_ctx(function: str, code: str) -> RunContext:
    ctx = _ctx(function)
    ctx.code_hash = code
    return ctx


def test_learned_limit_is_never_applied_to_other_code(rdb):
    _client, prefix = rdb
    mw = TunerMiddleware(_settings(prefix))
    for _ in range(5):  # the attacker teaches "victim" with a tiny program
        ctx = _code_ctx("victim", "attacker-code")
        mw.before_run(ctx)
        mw.after_run(ctx, _result(Status.SUCCESS, 5 * MB, ctx.limits.memory_bytes))
    taught = _code_ctx("victim", "attacker-code")
    mw.before_run(taught)
    assert taught.tuned and taught.limits.memory_bytes == 64 * MB
    victim = _code_ctx("victim", "victim-code")
    mw.before_run(victim)
    assert not victim.tuned and victim.limits.memory_bytes == 256 * MB
    stats = stats_for("victim", mw.store.history("victim"), POLICY)
    assert stats.runs == 5 and stats.code == "attacker-code" and stats.codes == 1


def test_oom_under_tuned_limit_retries_at_least_at_the_untuned_limit():
    assert retry_limit(64 * MB, POLICY, untuned=256 * MB) == 256 * MB
    assert retry_limit(200 * MB, POLICY, untuned=256 * MB) == 400 * MB
    assert retry_limit(1024 * MB, POLICY, untuned=256 * MB) is None
    assert retry_limit(64 * MB, POLICY) == 128 * MB


def test_oom_retry_survives_failing_bookkeeping(rdb, monkeypatch):
    _client, prefix = rdb
    mw = TunerMiddleware(_settings(prefix))
    for _ in range(3):
        _one_run(mw, "fn", 30 * MB)
    ctx = _ctx("fn")
    mw.before_run(ctx)
    assert ctx.tuned

    def broken(*_args):
        raise TypeError("bookkeeping bug")

    monkeypatch.setattr(mw.store, "record", broken)
    retry = mw.retry_limits(ctx, Outcome(Status.OOM, peak_memory_bytes=64 * MB))
    assert retry is not None and retry.memory_bytes == 256 * MB
