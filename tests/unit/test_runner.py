"""The runner's request path without Docker: stub pool, stub executor, stub fetch."""

from __future__ import annotations

import pytest

from nanogrid_celery.config import Settings
from nanogrid_celery.errors import (
    ContainerStartFailed,
    RunRejected,
    SandboxDirty,
    StorageUnavailable,
)
from nanogrid_celery.execution.request import RunRequest
from nanogrid_celery.execution.runner import Runner
from nanogrid_celery.middleware import Hooks, Middleware, RunContext
from nanogrid_celery.result import ExecutionResult, Status
from nanogrid_celery.sandbox.lease import Lease, LeaseState, LeaseStateError
from nanogrid_celery.sandbox.limits import RunLimits
from nanogrid_celery.sandbox.stub import StubExecutor, StubLease, StubPool, ok

SETTINGS = Settings(tuner_enabled=False, events_enabled=False, metrics_port=0)


def _fetch(files: dict[str, bytes] | None = None, error: Exception | None = None):
    def fetch(settings, runtime, bucket, key):
        if error is not None:
            raise error
        return files or {"main.py": b"print('ok')"}

    return fetch


def _runner(pool=None, executor=None, middleware=None, fetch=None) -> Runner:
    return Runner(
        SETTINGS,
        middleware=middleware or [],
        executor=executor or StubExecutor(),
        pool=pool or StubPool(),
        fetch=fetch or _fetch(),
    )


def _req(**kw) -> RunRequest:
    return RunRequest(
        request_id="r1", runtime=kw.pop("runtime", "python"), s3_bucket="b", s3_key="k", **kw
    )


class Recorder(Middleware):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def before_run(self, ctx: RunContext) -> None:
        self.log.append(f"before:{self.name}")

    def after_run(self, ctx, result, exc=None) -> None:
        self.log.append(f"after:{self.name}:{type(exc).__name__ if exc else '-'}")


def test_success_path_releases_the_lease():
    pool = StubPool()
    result = _runner(pool=pool).execute(_req())
    assert result.status == Status.SUCCESS and result.stdout == "ok\n"
    assert result.attempts == 1 and len(pool.released) == 1 and not pool.discarded
    assert pool.released[0].state == LeaseState.RELEASED


def test_after_hooks_run_in_reverse_order_with_the_exception():
    log: list[str] = []
    mws = [Recorder("outer", log), Recorder("inner", log)]
    _runner(middleware=mws).execute(_req())
    assert log == ["before:outer", "before:inner", "after:inner:-", "after:outer:-"]
    log.clear()
    _runner(middleware=mws).execute(_req(timeout_ms=0))
    assert log == ["after:inner:RunRejected", "after:outer:RunRejected"]  # no before: never fetched


def test_a_failing_hook_never_fails_the_run():
    class Broken(Middleware):
        def before_run(self, ctx):
            raise ValueError("boom")

        def after_run(self, ctx, result, exc=None):
            raise ValueError("boom")

    assert _runner(middleware=[Broken()]).execute(_req()).status == Status.SUCCESS


@pytest.mark.parametrize(
    ("req", "fetch", "needle"),
    [
        (_req(runtime="cobol"), None, "runtime"),
        (_req(timeout_ms=-1), None, "timeout_ms"),
        (_req(memory_mb=1), None, "memory_mb"),
        (_req(), _fetch(error=RunRejected("zip bomb")), "zip bomb"),
        (_req(), _fetch(files={"other.py": b""}), "main.py"),
    ],
)
def test_their_fault_is_rejected_before_any_container(req, fetch, needle):
    pool = StubPool()
    result = _runner(pool=pool, fetch=fetch).execute(req)
    assert result.status == Status.REJECTED and needle in result.message
    assert pool.leased == []


def test_our_fault_is_retried_once_on_a_fresh_container():
    calls = []

    def flaky(lease, step):
        calls.append(lease)
        if len(calls) == 1:
            raise SandboxDirty("agent vanished")
        return ok()

    pool = StubPool()
    result = _runner(pool=pool, executor=StubExecutor(flaky)).execute(_req())
    assert result.status == Status.SUCCESS and result.attempts == 2
    assert calls[0] is not calls[1]
    assert [le for le, _ in pool.discarded] == [calls[0]]


def test_our_fault_twice_is_internal_error():
    def broken(lease, step):
        raise SandboxDirty("agent vanished")

    pool = StubPool()
    result = _runner(pool=pool, executor=StubExecutor(broken)).execute(_req())
    assert result.status == Status.INTERNAL_ERROR and "twice" in result.message
    assert len(pool.discarded) == 2 and not pool.released


def test_cold_start_failure_is_retried_not_unexpected():
    """The cold path's agent-did-not-come-up used to be a bare RuntimeError: no retry."""
    pool = StubPool()
    pool.fail_acquire = [ContainerStartFailed("agent keeper in abc did not come up")]
    result = _runner(pool=pool).execute(_req())
    assert result.status == Status.SUCCESS and result.attempts == 2


def test_storage_outage_is_internal_error_not_rejected():
    result = _runner(fetch=_fetch(error=StorageUnavailable("S3 unavailable"))).execute(_req())
    assert result.status == Status.INTERNAL_ERROR and "S3" in result.message


def test_unexpected_exception_still_returns_a_result():
    def crash(lease, step):
        raise ZeroDivisionError("bug")

    result = _runner(executor=StubExecutor(crash)).execute(_req())
    assert result.status == Status.INTERNAL_ERROR and "ZeroDivisionError" in result.message


def test_failed_reset_discards_instead_of_reusing():
    def dirty(lease):
        raise SandboxDirty("processes survived the kill")

    pool = StubPool(reset=dirty)
    result = _runner(pool=pool).execute(_req())
    assert result.status == Status.SUCCESS
    assert pool.released == [] and "survived" in pool.discarded[0][1]


def test_middleware_retry_gets_new_limits():
    class Retry(Middleware):
        def retry_limits(self, ctx, outcome):
            if outcome.status == Status.OOM and ctx.attempt == 1:
                return RunLimits(1000, 512 << 20, 128, 1 << 20, 1 << 20)
            return None

    def oom_first(lease, step):
        if len(executor.steps) == 1:
            lease.cgroup.oom += 1
            return ok(b"", exit_code=137)
        return ok()

    executor = StubExecutor(oom_first)
    result = _runner(executor=executor, middleware=[Retry()]).execute(_req())
    assert result.status == Status.SUCCESS and result.attempts == 2
    assert result.limits["memory_mb"] == 512


def test_cpp_compiles_then_runs_and_prepares_the_next_step():
    executor = StubExecutor()
    files = {"main.cpp": b"int main(){}"}
    result = _runner(executor=executor, fetch=_fetch(files)).execute(_req(runtime="cpp"))
    assert result.status == Status.SUCCESS
    compile_step, run_step = executor.steps
    assert compile_step.prepare_next and not compile_step.stdin
    assert run_step.stdin and not run_step.prepare_next


def test_lease_refuses_transitions_outside_the_life_cycle():
    lease = StubLease("python")
    lease.to(LeaseState.ACQUIRED)
    lease.to(LeaseState.RUNNING)
    with pytest.raises(LeaseStateError):
        lease.to(LeaseState.ACQUIRED)  # a running container is never handed out again
    lease.to(LeaseState.DISCARDED)
    with pytest.raises(LeaseStateError):
        lease.to(LeaseState.RELEASED)


def test_hooks_emit_retry_takes_the_first_answer():
    class A(Middleware):
        def retry_limits(self, ctx, outcome):
            return RunLimits(1, 1, 1, 1, 1)

    class B(Middleware):
        def retry_limits(self, ctx, outcome):
            raise AssertionError("not asked once A answered")

    ctx = RunContext(_req(), ExecutionResult("r1", "python", Status.SUCCESS))
    assert Hooks([A(), B()]).emit_retry(ctx, None).timeout_ms == 1  # type: ignore[arg-type]


def test_stub_lease_is_a_lease():
    assert isinstance(StubLease("python"), Lease)


class _FakeContainer:
    id = "f" * 64
    attrs = {"State": {"Pid": 1}}
    removed = False

    def reload(self) -> None:
        return None

    def remove(self, force: bool = False) -> None:
        self.removed = True


class _FakeClient:
    def __init__(self) -> None:
        self.container = _FakeContainer()
        self.containers = self

    def run(self, **kwargs):
        return self.container


class _NeverReady(StubExecutor):
    def wait_ready(self, lease) -> bool:
        return False


def test_create_container_raises_an_internal_error_when_the_keeper_never_comes_up(
    monkeypatch, tmp_path
):
    from nanogrid_celery.sandbox import containers
    from nanogrid_celery.sandbox.stub import StubCgroup

    monkeypatch.setattr(containers, "ContainerCgroup", lambda cid, init_pid=None: StubCgroup())
    client = _FakeClient()
    settings = Settings(work_root=str(tmp_path))
    with pytest.raises(ContainerStartFailed, match="did not come up"):
        containers.create_container(settings, client, _NeverReady(), "python", role="cold")
    assert client.container.removed, "a container whose keeper failed is removed"
    assert not any(tmp_path.rglob("code")), "and its lease directory too"


def test_create_container_wraps_docker_errors(monkeypatch, tmp_path):
    import docker.errors

    from nanogrid_celery.sandbox import containers

    class Refusing(_FakeClient):
        def run(self, **kwargs):
            raise docker.errors.APIError("no space left on device")

    with pytest.raises(ContainerStartFailed, match="no space left"):
        containers.create_container(
            Settings(work_root=str(tmp_path)), Refusing(), StubExecutor(), "python"
        )
