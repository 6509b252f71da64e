"""Test-case batches through the runner without Docker: verdicts, limits, timeouts, OOM, compile."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanogrid_celery.config import Limits, Settings
from nanogrid_celery.errors import RunRejected
from nanogrid_celery.execution.batch import normalise, parse_cases
from nanogrid_celery.execution.request import RunRequest
from nanogrid_celery.execution.runner import Runner
from nanogrid_celery.middleware.result_stream import event_payload
from nanogrid_celery.result import Status
from nanogrid_celery.sandbox.box import Sandbox
from nanogrid_celery.sandbox.outcome import ProcessResult
from nanogrid_celery.sandbox.output import CappedBuffer
from nanogrid_celery.sandbox.stub import StubExecutor, StubPool, ok


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        tuner_enabled=False, events_enabled=False, metrics_port=0, work_root=str(tmp_path)
    )


def _stdin(lease) -> bytes:
    """The staged stdin: in the container's /sandbox (writable workdir) or the lease dir."""
    for path in (lease.root_view / "sandbox" / "stdin", lease.host_dir / "stdin"):
        if path.exists():
            return path.read_bytes()
    raise AssertionError("no stdin staged")


def echo_program(lease, step):
    """The 'program': its stdin decides what it does (echo, sleep past the limit, OOM, crash)."""
    if step.argv[0] == "g++":
        (lease.root_view / "tmp" / ".nanogrid-main").write_bytes(b"ELF")
        return ok(b"")
    data = _stdin(lease)
    if data == b"sleep":
        return ProcessResult(None, CappedBuffer(10), CappedBuffer(10), True, step.timeout_ms)
    if data == b"oom":
        lease.cgroup.oom += 1
        return ProcessResult(137, CappedBuffer(10), CappedBuffer(10), False, 3.0)
    if data == b"crash":
        return ok(b"", exit_code=3)
    return ok(data.upper())


def _runner(settings, executor, files):
    pool = StubPool()
    runner = Runner(
        settings,
        middleware=[],
        executor=executor,
        pool=pool,
        fetch=lambda *a: dict(files),
    )
    pool.reset = runner.sandbox.reset
    return runner, pool


def _req(runtime="python", **kw) -> RunRequest:
    return RunRequest(request_id="b1", runtime=runtime, s3_bucket="b", s3_key="k", **kw)


def test_mixed_verdicts_timeout_and_oom_in_one_lease(settings):
    executor = StubExecutor(echo_program)
    runner, pool = _runner(settings, executor, {"main.cpp": b"int main(){}"})
    cases = [
        {"stdin": "abc", "expected_stdout": "ABC\n\n"},  # trailing newlines ignored
        {"stdin": "abc", "expected_stdout": "abd"},
        {"stdin": "sleep", "expected_stdout": "x", "timeout_ms": 50},
        {"stdin": "oom", "memory_mb": 64},
        {"stdin": "crash"},
        {"stdin": "last", "expected_stdout": "LAST"},
    ]
    result = runner.execute(_req("cpp", cases=cases))
    assert result.status == Status.SUCCESS, result.message
    assert [c["status"] for c in result.cases] == [
        "success",
        "success",
        "timeout",
        "oom",
        "error",
        "success",
    ]
    assert [c.get("verdict") for c in result.cases] == [
        "accepted",
        "wrong_answer",
        "wrong_answer",
        None,
        None,
        "accepted",
    ]
    assert result.cases[2]["limits"]["timeout_ms"] == 50
    assert result.cases[3]["limits"]["memory_mb"] == 64
    assert result.cases[0]["stdout"] == "ABC"
    assert result.summary == {
        "accepted": 2,
        "cases": 6,
        "error": 1,
        "oom": 1,
        "success": 3,
        "timeout": 1,
        "wrong_answer": 2,
    }
    argvs = [s.argv[0] for s in executor.steps]
    assert argvs.count("g++") == 1 and len(argvs) == 7  # compiled once, six runs
    assert len(pool.leased) == 1 and len(pool.released) == 1  # one lease
    assert result.compile_cached is False


def test_a_repeated_batch_hits_the_build_cache(settings):
    executor = StubExecutor(echo_program)
    runner, _ = _runner(settings, executor, {"main.cpp": b"int main(){}"})
    runner.execute(_req("cpp", cases=[{"stdin": "a"}]))
    executor.steps.clear()
    result = runner.execute(_req("cpp", cases=[{"stdin": "a"}, {"stdin": "b"}]))
    assert result.compile_cached is True and result.compile_ms is None
    assert [s.argv[0] for s in executor.steps] == ["/tmp/.nanogrid-main"] * 2  # no g++
    assert [c["stdout"] for c in result.cases] == ["A", "B"]


def test_each_case_gets_fresh_scratch_and_its_own_binary(settings):
    seen = []

    def program(lease, step):
        if step.argv[0] == "g++":
            (lease.root_view / "tmp" / ".nanogrid-main").write_bytes(b"ELF")
            return ok(b"")
        tmp = lease.root_view / "tmp"
        seen.append(sorted(p.name for p in tmp.iterdir()))
        (tmp / "leftover").write_text("x")
        (tmp / ".nanogrid-main").write_bytes(b"tampered")  # the program rewrites its binary
        return ok(b"")

    runner, _ = _runner(settings, StubExecutor(program), {"main.cpp": b"int main(){}"})
    runner.execute(_req("cpp", cases=[{}, {}, {}]))
    assert seen == [[".nanogrid-main"]] * 3  # leftovers wiped between cases
    (entry,) = (Path(settings.work_root) / ".build-cache").glob("*.bin")
    assert entry.read_bytes() == b"ELF"  # stored before the program ran


def test_compile_error_ends_the_batch_once(settings):
    def program(lease, step):
        if step.argv[0] == "g++":
            err = CappedBuffer(1000)
            err.write(b"main.cpp:1: error: expected ';'")
            return ProcessResult(1, CappedBuffer(10), err, False, 20.0)
        raise AssertionError("no case may run after a compile error")

    runner, _ = _runner(settings, StubExecutor(program), {"main.cpp": b"int main("})
    result = runner.execute(_req("cpp", cases=[{"stdin": "1"}, {"stdin": "2"}]))
    assert result.status == Status.COMPILE_ERROR
    assert "expected ';'" in result.message
    assert result.cases == [] and result.summary == {"cases": 0}


def test_python_batch(settings):
    runner, _ = _runner(settings, StubExecutor(echo_program), {"main.py": b"print(input())"})
    cases = [{"stdin": str(i), "expected_stdout": str(i)} for i in range(100)]
    result = runner.execute(_req(cases=cases))
    assert result.status == Status.SUCCESS and result.summary["accepted"] == 100
    assert result.compile_cached is None


@pytest.mark.parametrize(
    "cases, match",
    [
        ([], "non-empty"),
        ("abc", "non-empty"),
        ([{"stdin": "x"}] * 101, "at most 100"),
        ([{"input": "x"}], "unknown keys"),
        ([{"stdin": 5}], "must be a string"),
        ([{"timeout_ms": 0}], "case 0: timeout_ms"),
        ([{}, {"memory_mb": 1}], "case 1: memory_mb"),
    ],
)
def test_bad_cases_are_rejected(settings, cases, match):
    with pytest.raises(RunRejected, match=match):
        parse_cases(settings, cases, None, None)
    runner, pool = _runner(settings, StubExecutor(), {"main.py": b""})
    result = runner.execute(_req(cases=cases))
    assert result.status == Status.REJECTED and not pool.leased


def test_case_stdin_over_the_maximum_is_rejected(tmp_path):
    settings = Settings(work_root=str(tmp_path), limits=Limits(max_stdin_bytes=10))
    with pytest.raises(RunRejected, match="case 0: stdin is 11 bytes"):
        parse_cases(settings, [{"stdin": "x" * 11}], None, None)


def test_output_comparison_rule():
    assert normalise("1 2  \r\n3\n\n\n") == normalise("1 2\n3")
    assert normalise(" 1") != normalise("1")  # leading whitespace counts
    assert normalise("a\n\nb") != normalise("a\nb")  # inner blank lines count


def test_events_cap_every_case_output(settings):
    runner, _ = _runner(settings, StubExecutor(echo_program), {"main.py": b""})
    result = runner.execute(_req(cases=[{"stdin": "y" * 5000}] * 3))
    payload = event_payload(result, 4096, 256)
    assert all(len(c["stdout"]) == 256 for c in payload["cases"])
    assert payload["output_cut"]
    assert len(result.cases[0]["stdout"]) == 5000


def test_a_sandbox_without_build_cache_still_reuses_the_binary(tmp_path):
    settings = Settings(work_root=str(tmp_path), build_cache_mb=0)
    runner, _ = _runner(settings, StubExecutor(echo_program), {"main.cpp": b"int main(){}"})
    assert isinstance(runner.sandbox, Sandbox) and runner.sandbox.builds is None
    result = runner.execute(_req("cpp", cases=[{"stdin": "a"}, {"stdin": "b"}]))
    assert [c["stdout"] for c in result.cases] == ["A", "B"]
    assert result.compile_cached is False


def test_a_batch_is_never_memory_tuned(settings):
    from dataclasses import replace

    from nanogrid_celery.middleware import Middleware

    class Tuner(Middleware):  # what the tuner does: only when memory was not explicit
        def before_run(self, ctx):
            if not ctx.explicit_memory:
                ctx.limits = replace(ctx.limits, memory_bytes=40 << 20)

    runner = Runner(
        settings,
        middleware=[Tuner()],
        executor=StubExecutor(echo_program),
        pool=StubPool(),
        fetch=lambda *a: {"main.py": b""},
    )
    result = runner.execute(_req(cases=[{"stdin": "a"}, {"stdin": "b", "memory_mb": 64}]))
    assert [c["limits"]["memory_mb"] for c in result.cases] == [256, 64]
    assert runner.execute(_req()).limits["memory_mb"] == 40  # a plain run still is


def test_limits_are_written_only_when_a_case_changes_them(settings, monkeypatch):
    """Each case runs under its own limits; unchanged ones are not written again."""
    from nanogrid_celery.sandbox.stub import StubCgroup

    writes: list[int] = []
    original = StubCgroup.set_memory_limit

    def counted(self, limit):
        writes.append(limit)
        original(self, limit)

    monkeypatch.setattr(StubCgroup, "set_memory_limit", counted)
    seen: list[int] = []

    def program(lease, step):
        seen.append(lease.cgroup.memory)
        return ok(b"x")

    runner, _ = _runner(settings, StubExecutor(program), {"main.py": b"print(1)"})
    cases = [{}, {}, {"memory_mb": 64}, {"memory_mb": 64}, {}]
    result = runner.execute(_req(cases=cases))
    assert result.status == Status.SUCCESS, result
    default = settings.limits.default_memory_mb << 20
    assert seen == [default, default, 64 << 20, 64 << 20, default]
    assert writes[:3] == [default, 64 << 20, default]  # then the release reset
