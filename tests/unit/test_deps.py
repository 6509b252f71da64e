"""requirements.txt environments without Docker: parsing, real pip builds from a local index
on 127.0.0.1, one build for concurrent first uses (threads and processes), LRU eviction that
spares environments in use, limits, and the runner's dependency_error path (no lease)."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest

from nanogrid_celery.config import Settings
from nanogrid_celery.errors import DependencyError, RunRejected
from nanogrid_celery.execution.deps import Dependencies
from nanogrid_celery.execution.request import RunRequest
from nanogrid_celery.execution.requirements import parse_requirements
from nanogrid_celery.execution.runner import Runner
from nanogrid_celery.result import Status
from nanogrid_celery.sandbox.envs import ENVS_MOUNT, SITE, EnvStore, PipBuilder, Target, env_key
from nanogrid_celery.sandbox.stub import StubExecutor, StubPool
from tests.wheelhouse import LocalIndex

TARGET = Target("sha256:test-image", "3.11")
MB = 1024 * 1024


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    idx = LocalIndex(tmp_path_factory.mktemp("index"))
    idx.add("ngdemo", "1.2.3", requires=("ngdep>=0.1",))
    idx.add("ngdep", "0.4.0")
    idx.start()
    yield idx
    idx.stop()


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings(
        deps_dir=str(tmp_path / "envs"), tuner_enabled=False, events_enabled=False, **kw
    )


# -- requirements.txt ----------------------------------------------------------------------
def test_pinned_unpinned_comments_and_blank_lines_normalise():
    text = (
        b"# tools\n\nSix == 1.16.0  # pinned\nattrs\nZope.Interface[Docs,test]>=5,<7\nsix==1.16.0\n"
    )
    assert parse_requirements(text) == [
        "attrs",
        "six==1.16.0",
        "zope-interface[docs,test]<7,>=5",
    ]


def test_markers_and_continuations_are_kept():
    reqs = parse_requirements(b'six ; python_version >= "3"\nattrs \\\n  ==23.2.0\n')
    assert reqs == ["attrs==23.2.0", 'six; python_version >= "3"']


@pytest.mark.parametrize(
    "line",
    [
        "-e .",
        "--index-url https://example.invalid/simple",
        "-r other.txt",
        "--find-links /tmp",
        "-i http://x",
        "https://example.invalid/pkg.whl",
        "git+https://example.invalid/repo.git",
        "./local/pkg",
        "/abs/pkg",
        "pkg @ https://example.invalid/pkg.whl",
        "pkg @ file:///etc/passwd",
        "not a requirement!!",
    ],
)
def test_options_urls_and_paths_are_rejected_with_a_message(line):
    with pytest.raises(RunRejected, match=r"requirements\.txt line 2"):
        parse_requirements(f"six\n{line}\n".encode())


def test_too_many_requirements_are_rejected():
    with pytest.raises(RunRejected, match="more than 3"):
        parse_requirements(b"a\nb\nc\nd\n", max_lines=3)


def test_key_depends_on_requirements_image_and_python():
    base = env_key(["six==1.16.0"], TARGET)
    assert base == env_key(["six==1.16.0"], Target("sha256:test-image", "3.11"))
    assert base != env_key(["six==1.16.0"], Target("sha256:other", "3.11"))
    assert base != env_key(["six==1.16.0"], Target("sha256:test-image", "3.12"))
    assert base != env_key(["six"], TARGET)


# -- real pip against the local index ------------------------------------------------------
def test_build_installs_requirements_and_their_dependencies(tmp_path, index):
    store = EnvStore(_settings(tmp_path, pip_index_url=index.url))
    handle = store.acquire(["ngdemo==1.2.3"], TARGET)
    try:
        site = handle.host_path / SITE
        assert (site / "ngdemo" / "__init__.py").read_text() == "__version__ = '1.2.3'\n"
        assert (site / "ngdep" / "__init__.py").exists()  # resolved from Requires-Dist
        assert handle.built and handle.pythonpath == f"{ENVS_MOUNT}/{handle.key}/{SITE}"
        assert oct((site / "ngdemo" / "__init__.py").stat().st_mode & 0o777) == "0o644"
        assert not (handle.host_path / "wheels").exists()  # downloads are not kept
    finally:
        handle.release()
    again = store.acquire(["ngdemo==1.2.3"], TARGET)
    again.release()
    assert not again.built and again.key == handle.key
    assert again.ms < 50


def test_unknown_requirement_is_a_dependency_error_naming_it_and_not_cached(tmp_path, index):
    store = EnvStore(_settings(tmp_path, pip_index_url=index.url))
    for _ in range(2):  # not cached as a failure either: tried again, fails again
        with pytest.raises(DependencyError, match="nanogrid-no-such-package"):
            store.acquire(["nanogrid-no-such-package==9.9"], TARGET)
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".")] == []
    assert list((store.root / ".tmp").iterdir()) == []


def test_unsatisfiable_version_names_the_requirement(tmp_path, index):
    store = EnvStore(_settings(tmp_path, pip_index_url=index.url))
    with pytest.raises(DependencyError, match=r"ngdemo==7\.0"):
        store.acquire(["ngdemo==7.0"], TARGET)


def test_local_wheel_folder_alone_is_the_only_source(tmp_path, index):
    store = EnvStore(_settings(tmp_path, pip_find_links=str(index.files)))
    handle = store.acquire(["ngdep"], TARGET)
    handle.release()
    assert (handle.host_path / SITE / "ngdep").is_dir()


def test_build_out_of_time_is_a_dependency_error(tmp_path, index):
    builder = PipBuilder(_settings(tmp_path, pip_index_url=index.url))
    with pytest.raises(DependencyError, match="ran out of time"):
        builder._pip(["true"], ["ngdep"], time.monotonic() - 1, True)


class CountingBuilder:
    """Wraps a builder and counts builds (threads of one process)."""

    def __init__(self, inner) -> None:
        self.inner, self.count, self.lock = inner, 0, threading.Lock()

    def build(self, requirements, target, dest, deadline) -> None:
        with self.lock:
            self.count += 1
        self.inner.build(requirements, target, dest, deadline)


def test_concurrent_first_uses_in_threads_build_once(tmp_path, index):
    settings = _settings(tmp_path, pip_index_url=index.url)
    builder = CountingBuilder(PipBuilder(settings))
    stores = [EnvStore(settings, builder) for _ in range(4)]  # one store per "worker"
    handles, errors = [], []

    def use(store: EnvStore) -> None:
        try:
            handles.append(store.acquire(["ngdemo"], TARGET))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert builder.count == 1
    assert sum(h.built for h in handles) == 1 and len({h.key for h in handles}) == 1
    for h in handles:
        h.release()


class FakeBuilder:
    """Writes ``size`` bytes into site/; logs each build to a file (shared across processes)."""

    def __init__(self, size: int = 1024, log: Path | None = None, delay: float = 0.0) -> None:
        self.size, self.log, self.delay = size, log, delay

    def build(self, requirements, target, dest, deadline) -> None:
        if self.log:
            with self.log.open("a") as fh:
                fh.write(f"{os.getpid()} {requirements}\n")
        time.sleep(self.delay)
        (dest / SITE).mkdir()
        (dest / SITE / "blob").write_bytes(b"x" * self.size)


def _process_use(settings: Settings, log: Path, barrier) -> None:
    barrier.wait()
    EnvStore(settings, FakeBuilder(log=log, delay=0.5)).acquire(["shared"], TARGET).release()


def test_concurrent_first_uses_in_processes_build_once(tmp_path):
    settings = _settings(tmp_path)
    log = tmp_path / "builds.log"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_process_use, args=(settings, log, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1


def test_lru_eviction_spares_environments_in_use(tmp_path):
    store = EnvStore(_settings(tmp_path, deps_cache_mb=2), FakeBuilder(size=MB))
    held = store.acquire(["b"], TARGET)  # oldest, but in use all along
    time.sleep(0.02)
    store.acquire(["a"], TARGET).release()
    time.sleep(0.02)
    newest = store.acquire(["c"], TARGET)  # 3 MB > 2 MB: the LRU env not in use goes
    keys = {p.name for p in store.root.iterdir() if not p.name.startswith(".")}
    assert keys == {held.key, newest.key}
    assert store.total_bytes() == 2 * MB
    held.release()
    newest.release()


def test_recent_use_protects_from_eviction(tmp_path):
    store = EnvStore(_settings(tmp_path, deps_cache_mb=2), FakeBuilder(size=MB))
    a = store.acquire(["a"], TARGET)
    a.release()
    time.sleep(0.02)
    b = store.acquire(["b"], TARGET)
    b.release()
    time.sleep(0.02)
    store.acquire(["a"], TARGET).release()  # a is now the most recently used
    time.sleep(0.02)
    store.acquire(["c"], TARGET).release()
    keys = {p.name for p in store.root.iterdir() if not p.name.startswith(".")}
    assert b.key not in keys and a.key in keys


def test_nothing_is_evicted_while_everything_is_in_use(tmp_path):
    store = EnvStore(_settings(tmp_path, deps_cache_mb=1), FakeBuilder(size=MB))
    handles = [store.acquire([name], TARGET) for name in "abc"]
    assert store.total_bytes() == 3 * MB  # over the cap, temporarily: none may go
    for h in handles:
        h.release()
    assert store.evict() and store.total_bytes() <= MB


def test_an_environment_over_the_size_limit_is_refused_and_not_cached(tmp_path):
    store = EnvStore(_settings(tmp_path, deps_max_env_mb=1), FakeBuilder(size=2 * MB))
    with pytest.raises(DependencyError, match="over the 1 MB limit"):
        store.acquire(["big"], TARGET)
    assert not (store.root / env_key(["big"], TARGET)).exists()


def test_prebuilt_sets_are_warmed_in_the_background(tmp_path):
    settings = _settings(tmp_path, prebuilt_envs="a;b,c")
    store = EnvStore(settings, FakeBuilder())
    deps = Dependencies(settings, lambda: None, store=store, target=lambda: TARGET)
    thread = deps.warm()
    assert thread is not None
    thread.join(10)
    for reqs in (["a"], ["b", "c"]):
        assert (store.root / env_key(reqs, TARGET)).is_dir()


# -- the runner ------------------------------------------------------------------------------
def _runner(tmp_path: Path, builder, files: dict[str, bytes]) -> tuple[Runner, StubPool]:
    settings = _settings(tmp_path, metrics_port=0)
    pool, executor = StubPool(), StubExecutor()
    deps = Dependencies(
        settings, lambda: None, store=EnvStore(settings, builder), target=lambda: TARGET
    )
    runner = Runner(
        settings,
        middleware=[],
        executor=executor,
        pool=pool,
        fetch=lambda *a: files,
        deps=deps,
    )
    return runner, pool


def _req() -> RunRequest:
    return RunRequest(request_id="r1", runtime="python", s3_bucket="b", s3_key="k")


def test_runner_runs_with_the_environment_on_pythonpath(tmp_path):
    files = {"main.py": b"import x", "requirements.txt": b"x==1\n"}
    runner, _ = _runner(tmp_path, FakeBuilder(), files)
    result = runner.execute(_req())
    assert result.status == Status.SUCCESS, result.message
    key = env_key(["x==1"], TARGET)
    assert result.deps_env == key and result.deps_ms is not None
    (step,) = runner.executor.steps
    assert step.env == {"PYTHONPATH": f"{ENVS_MOUNT}/{key}/{SITE}"}
    # released after the run: evictable now
    assert runner.deps.store._evict_one(key)


class FailingBuilder:
    def build(self, requirements, target, dest, deadline) -> None:
        raise DependencyError("could not install requirements.txt: ERROR: No matching x==1")


def test_a_dependency_error_leases_no_container_and_is_not_retried(tmp_path):
    files = {"main.py": b"import x", "requirements.txt": b"x==1\n"}
    runner, pool = _runner(tmp_path, FailingBuilder(), files)
    result = runner.execute(_req())
    assert result.status == Status.DEPENDENCY_ERROR
    assert "x==1" in result.message
    assert pool.leased == [] and result.attempts == 1


def test_an_options_line_is_rejected_before_any_build(tmp_path):
    files = {"main.py": b"", "requirements.txt": b"--index-url http://evil.invalid/\nsix\n"}
    runner, pool = _runner(tmp_path, FailingBuilder(), files)
    result = runner.execute(_req())
    assert result.status == Status.REJECTED and "--index-url" in result.message
    assert pool.leased == []


def test_no_requirements_or_only_comments_means_no_environment(tmp_path):
    files = {"main.py": b"", "requirements.txt": b"# nothing\n\n"}
    runner, _ = _runner(tmp_path, FailingBuilder(), files)
    result = runner.execute(_req())
    assert result.status == Status.SUCCESS and result.deps_env is None
    assert runner.executor.steps[0].env is None


def test_downloads_over_the_size_limit_are_refused_before_install(tmp_path):
    idx = LocalIndex(tmp_path / "index")
    idx.add("ngbig", "1.0", padding=2 * MB)
    idx.start()
    try:
        store = EnvStore(_settings(tmp_path, pip_index_url=idx.url, deps_max_env_mb=1))
        with pytest.raises(DependencyError, match="wheels for ngbig are over the 1 MB limit"):
            store.acquire(["ngbig"], TARGET)
        assert list((store.root / ".tmp").iterdir()) == []
    finally:
        idx.stop()
