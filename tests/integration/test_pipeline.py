"""Issue #2: client -> S3 -> SQS -> worker -> warm container -> Redis, for real."""

from __future__ import annotations

import io
import uuid
import zipfile

import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.execution.storage import upload
from nanogrid_celery.result import Status

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

HELLO_CPP = '#include <iostream>\nint main(){ std::cout << "hello cpp" << std::endl; }\n'


def test_python_hello_world(run):
    result = run({"main.py": "print('hello python')"})
    assert result.status == Status.SUCCESS, result
    assert result.stdout == "hello python\n"
    assert result.exit_code == 0
    assert result.start == "warm"
    assert result.duration_ms > 0 and result.total_ms >= result.duration_ms
    assert result.queue_ms is not None and result.worker and result.container_id


def test_single_file_upload(run, tmp_path):
    path = tmp_path / "solution.py"
    path.write_text("print(6 * 7)")
    assert run(path).stdout == "42\n"


def test_cpp_hello_world(run):
    # fresh source each session: the host's build cache (issue 16) must not answer this one
    code = {"main.cpp": HELLO_CPP + f"// {uuid.uuid4().hex}\n"}
    result = run(code, "cpp")
    assert result.status == Status.SUCCESS, result
    assert result.stdout == "hello cpp\n"
    assert result.compile_ms and result.compile_ms > 0
    assert result.compile_cached is False


def test_cpp_alias_and_run_sh(run):
    files = {"run.sh": "echo from-run-sh; echo $((6*7))"}
    result = run(files, "c++")
    assert result.status == Status.SUCCESS, result
    assert result.runtime == "cpp"
    assert result.stdout == "from-run-sh\n42\n"


def test_stdin(run):
    result = run({"main.py": "import sys; print(sys.stdin.read().upper())"}, stdin="abc\n")
    assert result.stdout == "ABC\n\n"


def test_nonzero_exit(run):
    result = run({"main.py": "import sys; print('x', file=sys.stderr); sys.exit(3)"})
    assert result.status == Status.ERROR
    assert result.exit_code == 3
    assert result.stderr == "x\n"
    assert "3" in result.message


def test_compile_error(run):
    result = run({"main.cpp": "int main( { return 0 }"}, "cpp")
    assert result.status == Status.COMPILE_ERROR
    assert "error" in result.message
    assert result.exit_code != 0


def test_missing_s3_key_is_rejected_and_worker_keeps_serving(worker):
    request_id = f"req-{uuid.uuid4().hex}"
    handle = client.enqueue(
        request_id,
        "python",
        get_settings().s3_bucket,
        f"missing/{request_id}.py",
        queue=worker.queue,
    )
    result = client.wait(handle, timeout=60)
    assert result.status == Status.REJECTED
    assert "no code" in result.message
    assert worker.run({"main.py": "print('still here')"}).stdout == "still here\n"


def test_zip_object_and_prefix_layouts(worker):
    settings = get_settings()
    rid = uuid.uuid4().hex
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("main.py", "import helper; helper.hi()")
        zf.writestr("helper.py", "def hi(): print('zip ok')")
    client._bucket_ready(settings)
    upload(settings, f"t/{rid}/code.zip", buf.getvalue())
    upload(settings, f"t/{rid}/dir/main.py", b"import util; print(util.X)")
    upload(settings, f"t/{rid}/dir/util.py", b"X = 'prefix ok'")
    r1 = client.wait(
        client.enqueue(
            f"a-{rid}", "python", settings.s3_bucket, f"t/{rid}/code.zip", queue=worker.queue
        ),
        timeout=60,
    )
    r2 = client.wait(
        client.enqueue(
            f"b-{rid}", "python", settings.s3_bucket, f"t/{rid}/dir/", queue=worker.queue
        ),
        timeout=60,
    )
    assert (r1.status, r1.stdout) == (Status.SUCCESS, "zip ok\n")
    assert (r2.status, r2.stdout) == (Status.SUCCESS, "prefix ok\n")


def test_result_is_found_by_request_id(worker):
    handle = worker.submit({"main.py": "print(1)"})
    again = client.wait(handle.id, timeout=60)
    assert again.request_id == handle.id and again.stdout == "1\n"


@pytest.mark.cgroups
def test_container_is_paused_again_and_reused(worker):
    first = worker.run({"main.py": "print(1)"})
    assert worker.wait_pool_full()
    second = worker.run({"main.py": "print(2)"})
    assert first.start == second.start == "warm"
    assert first.container_id == second.container_id
    by_id = {c.id[:12]: c for c in worker.containers()}
    assert by_id[second.container_id].status == "paused" or worker.wait_pool_full()
    assert worker.paused_count() == worker.pool_target


def test_two_concurrent_submissions():
    w = WorkerProcess("concurrent", concurrency=2, pool_python=1, pool_cpp=1).start()
    try:
        code = {"main.py": "import time, os; time.sleep(1); print(os.getpid() > 0)"}
        handles = [w.submit(code) for _ in range(2)]
        results = [client.wait(h, timeout=60) for h in handles]
        assert all(r.status == Status.SUCCESS for r in results), results
        assert len({r.worker for r in results}) == 2, "both child processes should serve"
        assert len({r.container_id for r in results}) == 2
        starts = sorted(r.started_at for r in results)
        finishes = sorted(r.finished_at for r in results)
        assert starts[1] < finishes[0], "the two runs should overlap in time"
    finally:
        w.stop()
    assert w.containers() == []
