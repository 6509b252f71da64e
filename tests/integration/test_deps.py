"""Issue 15: python submissions with requirements.txt, through a real worker and Docker.

The worker builds from a local PEP 503 index on 127.0.0.1 (tests/wheelhouse.py),
never a public one, into its own env root; the opt-in test at the end uses the
host's configured index (``NANOGRID_TEST_PUBLIC_INDEX=1``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from nanogrid_celery.result import Status
from tests.wheelhouse import LocalIndex

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

VERSIONS = "import ngdemo, ngdep\nprint(ngdemo.__version__, ngdep.__version__)\n"


@pytest.fixture(scope="module")
def index():
    root = Path(tempfile.mkdtemp(prefix="nanogrid-index-"))
    idx = LocalIndex(root)
    idx.add("ngdemo", "1.2.3", requires=("ngdep>=0.1",))
    idx.add("ngdep", "0.4.0")
    idx.start()
    yield idx
    idx.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def envs_dir():
    path = Path(tempfile.mkdtemp(prefix="nanogrid-envs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _worker(name: str, index: LocalIndex, envs_dir: Path, **env) -> WorkerProcess:
    return WorkerProcess(
        name,
        concurrency=1,
        pool_python=1,
        pool_cpp=0,
        pip_index_url=index.url,
        deps_dir=str(envs_dir),
        **env,
    ).start()


@pytest.fixture(scope="module")
def deps_worker(index, envs_dir):
    w = _worker("deps", index, envs_dir)
    yield w
    w.stop()
    assert w.containers() == [], "worker shutdown left containers behind"


def _files(main: str, requirements: str) -> dict[str, str]:
    return {"main.py": main, "requirements.txt": requirements}


def test_requirements_are_importable_in_the_zygote(deps_worker):
    first = deps_worker.run(_files(VERSIONS, "ngdemo==1.2.3\n"))
    assert first.status == Status.SUCCESS, first
    assert first.stdout == "1.2.3 0.4.0\n"
    assert first.deps_env and first.deps_ms is not None
    again = deps_worker.run(_files(VERSIONS + "# changed code, same requirements\n", "ngdemo\n"))
    assert again.status == Status.SUCCESS and again.stdout == "1.2.3 0.4.0\n"
    assert again.deps_env != first.deps_env  # "ngdemo" and "ngdemo==1.2.3" are two sets
    third = deps_worker.run(_files("import ngdemo; print(ngdemo.__version__)", "NGDemo == 1.2.3"))
    assert third.deps_env == first.deps_env and third.deps_ms < 50  # built once, normalised


def test_a_run_without_requirements_does_not_see_an_environment(deps_worker):
    deps_worker.run(_files(VERSIONS, "ngdemo==1.2.3\n"))
    plain = deps_worker.run({"main.py": "import ngdemo"})
    assert plain.status == Status.ERROR and "ModuleNotFoundError" in plain.stderr
    assert plain.deps_env is None


def test_a_bogus_requirement_is_a_dependency_error_naming_it(deps_worker):
    result = deps_worker.run(_files("print('never')", "ngdemo\nnanogrid-bogus-pkg==0.0.1\n"))
    assert result.status == Status.DEPENDENCY_ERROR, result
    assert "nanogrid-bogus-pkg==0.0.1" in result.message
    assert result.container_id is None and result.attempts == 1  # no lease, no retry


def test_an_options_line_is_rejected(deps_worker):
    result = deps_worker.run(_files("print(1)", "--extra-index-url http://evil.invalid/\n"))
    assert result.status == Status.REJECTED and "--extra-index-url" in result.message


def test_the_environment_is_read_only_and_unlisted(deps_worker):
    probe = (
        "import os, ngdep\n"
        "site = os.path.dirname(os.path.dirname(ngdep.__file__))\n"
        "for path in (os.path.join(site, 'evil.py'), ngdep.__file__):\n"
        "    try:\n"
        "        open(path, 'a').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as exc:\n"
        "        print(type(exc).__name__, exc.errno)\n"
        "print('ro', bool(os.statvfs(site).f_flag & os.ST_RDONLY))\n"
        "try:\n"
        "    print(os.listdir('/nanogrid/envs'))\n"
        "except OSError as exc:\n"
        "    print('list', type(exc).__name__)\n"
    )
    result = deps_worker.run(_files(probe, "ngdep==0.4.0\n"))
    assert result.status == Status.SUCCESS, result
    lines = result.stdout.splitlines()
    assert not any(line.startswith("wrote") for line in lines), lines
    assert lines[0] == "OSError 30"  # EROFS: nothing can be created in it
    assert lines[1] in ("OSError 30", "PermissionError 13")  # root's 0644 file, and read-only
    assert lines[2] == "ro True"  # the bind mount itself is read-only, whatever the modes
    assert lines[3] == "list PermissionError"  # 0711: other tenants' env keys are not listed


def test_the_program_has_no_network_even_with_dependencies(deps_worker, index):
    port = index.server.server_address[1]
    probe = (
        "import socket\n"
        f"for host in ('127.0.0.1', '172.17.0.1', '1.1.1.1'):\n"
        "    try:\n"
        f"        socket.create_connection((host, {port}), timeout=2).close()\n"
        "        print(host, 'connected')\n"
        "    except OSError as exc:\n"
        "        print(host, type(exc).__name__)\n"
    )
    result = deps_worker.run(_files(probe, "ngdep==0.4.0\n"))
    assert result.status == Status.SUCCESS, result
    assert "connected" not in result.stdout, result.stdout


def test_exec_executor_sees_the_same_environment(index, envs_dir):
    w = _worker("deps-exec", index, envs_dir, executor="exec")
    try:
        result = w.run(_files(VERSIONS, "ngdemo==1.2.3\n"))
        assert result.status == Status.SUCCESS, result
        assert result.stdout == "1.2.3 0.4.0\n"
    finally:
        w.stop()


@pytest.mark.public_index
@pytest.mark.skipif(
    os.environ.get("NANOGRID_TEST_PUBLIC_INDEX") != "1",
    reason="uses the host's configured pip index; set NANOGRID_TEST_PUBLIC_INDEX=1",
)
def test_six_and_attrs_from_the_hosts_index():
    envs = Path(tempfile.mkdtemp(prefix="nanogrid-envs-public-"))
    w = WorkerProcess("deps-public", concurrency=1, pool_python=1, pool_cpp=0, deps_dir=str(envs))
    w.start()
    try:
        code = "import six, attrs\nprint(six.__version__, attrs.__version__)\n"
        result = w.run(_files(code, "six==1.16.0\nattrs==23.2.0\n"), wait=400)
        print(f"public index: {result.stdout.strip()!r} build {result.deps_ms} ms")
        assert result.status == Status.SUCCESS, result
        assert result.stdout == "1.16.0 23.2.0\n"
    finally:
        w.stop()
        shutil.rmtree(envs, ignore_errors=True)
