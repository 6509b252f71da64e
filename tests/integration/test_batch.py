"""Issue 16 for real: build cache, test-case batches and large inputs over moto, Redis, Docker."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.errors import RunRejected
from nanogrid_celery.execution.inputs import encode_cases
from nanogrid_celery.middleware.result_stream import parse_entry
from nanogrid_celery.result import Status
from nanogrid_celery.sandbox.build_cache import CACHE_DIR

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

JUDGE_CPP = r"""
#include <iostream>
#include <vector>
#include <unistd.h>
// %s
int main() {
    long n; std::cin >> n;
    if (n == -1) { for (;;) sleep(1); }
    if (n == -2) { std::vector<char> v; for (;;) { v.resize(v.size() + (1 << 20), 1); } }
    if (n == -3) { if (fork() == 0) { for (;;) sleep(1); } }
    std::cout << n * 2 << "\n";
}
"""

# The program replaces the file it was started from (its own binary path) with a link to a
# host-looking secret and a FIFO: a cache store that ran after the program would pick it up.
SELF_REPLACING_CPP = r"""
#include <cstdio>
#include <unistd.h>
#include <sys/stat.h>
// %s
int main() {
    unlink("/tmp/.nanogrid-main");
    symlink("/etc/shadow", "/tmp/.nanogrid-main");
    unlink("/tmp/.nanogrid-main");
    mkfifo("/tmp/.nanogrid-main", 0666);
    std::puts("ran");
}
"""


def _short_dir() -> Path:
    """A work root short enough for the agent's socket path (AF_UNIX allows 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="ng", dir="/tmp"))


@pytest.fixture(scope="module")
def work_root():
    path = _short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def judge(work_root):
    w = WorkerProcess(
        "batch", concurrency=1, pool_python=1, pool_cpp=1, work_root=str(work_root)
    ).start()
    yield w
    w.stop()
    assert w.containers() == [], "worker shutdown left containers behind"


def _unique(template: str) -> str:
    return template % uuid.uuid4().hex  # a fresh build key: this test's first run is a miss


def test_repeated_cpp_run_does_not_compile(judge, work_root):
    code = {"main.cpp": _unique(JUDGE_CPP)}
    first = judge.run(code, "cpp", stdin="21")
    assert first.status == Status.SUCCESS, first
    assert first.stdout == "42\n"
    assert first.compile_cached is False and first.compile_ms > 0
    second = judge.run(code, "cpp", stdin="4")
    assert second.status == Status.SUCCESS, second
    assert second.stdout == "8\n"
    assert second.compile_cached is True and not second.compile_ms
    entries = list((work_root / CACHE_DIR).glob("*.bin"))
    assert entries and all(e.read_bytes()[:4] == b"\x7fELF" for e in entries)


def test_python_results_say_nothing_was_compiled(judge):
    result = judge.run({"main.py": "print(1)"})
    assert result.status == Status.SUCCESS and result.compile_cached is None


def test_a_program_replacing_its_own_binary_does_not_poison_the_cache(judge, work_root):
    code = {"main.cpp": _unique(SELF_REPLACING_CPP)}
    first = judge.run(code, "cpp")
    assert first.status == Status.SUCCESS and first.stdout == "ran\n", first
    assert first.compile_cached is False
    for entry in (work_root / CACHE_DIR).glob("*.bin"):
        st = entry.lstat()
        assert stat.S_ISREG(st.st_mode) and entry.read_bytes()[:4] == b"\x7fELF"
    second = judge.run(code, "cpp")  # the cached binary is the real build, not a link or FIFO
    assert second.status == Status.SUCCESS and second.stdout == "ran\n", second
    assert second.compile_cached is True


def test_no_case_can_change_the_binary_the_next_case_runs(judge):
    """Each case tries to replace the binary (the first, compiled as the sandbox user, can);
    the binary is kept between cases only while exactly as placed, so every case runs the
    real build - first uncached, then from the cache."""
    code = {"main.cpp": _unique(SELF_REPLACING_CPP)}
    for cached in (False, True):
        result = judge.run(code, "cpp", cases=[{"expected_stdout": "ran"}] * 4)
        assert result.status == Status.SUCCESS, result
        assert result.compile_cached is cached
        assert result.summary == {"accepted": 4, "cases": 4, "success": 4}, result.cases


def test_cpp_batch_with_mixed_verdicts_a_timeout_and_an_oom(judge):
    cases = [
        {"stdin": "2", "expected_stdout": "4"},
        {"stdin": "3", "expected_stdout": "7"},
        {"stdin": "-1", "expected_stdout": "0", "timeout_ms": 300},
        {"stdin": "-2", "memory_mb": 64},
        {"stdin": "-3", "expected_stdout": "-6"},  # leaves a child behind
        {"stdin": "5", "expected_stdout": "10\n"},
    ]
    result = judge.run({"main.cpp": _unique(JUDGE_CPP)}, "cpp", cases=cases)
    assert result.status == Status.SUCCESS, result
    statuses = [c["status"] for c in result.cases]
    assert statuses == ["success", "success", "timeout", "oom", "success", "success"], result
    verdicts = [c.get("verdict") for c in result.cases]
    assert verdicts == ["accepted", "wrong_answer", "wrong_answer", None, "accepted", "accepted"]
    assert result.summary["accepted"] == 3 and result.summary["wrong_answer"] == 2
    assert result.cases[3]["limits"]["memory_mb"] == 64
    assert result.cases[2]["duration_ms"] >= 300
    assert all(c["peak_memory_bytes"] for c in result.cases)
    assert result.compile_cached is False and result.compile_ms > 0


def test_cli_runs_a_cases_file(judge, tmp_path):
    (tmp_path / "main.py").write_text("print(int(input()) + 1)")
    cases = tmp_path / "cases.json"
    cases.write_text(
        json.dumps({"cases": [{"stdin": "1", "expected_stdout": "2"}, {"stdin": "5"}]})
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanogrid_celery.cli",
            "run",
            str(tmp_path / "main.py"),
            "--cases",
            str(cases),
            "--json",
        ],
        env={**os.environ, "NANOGRID_QUEUE": judge.queue},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["summary"] == {"accepted": 1, "cases": 2, "success": 2}
    assert [c["stdout"] for c in result["cases"]] == ["2\n", "6\n"]


def test_compile_error_ends_the_batch_once(judge):
    result = judge.run({"main.cpp": "int main( {"}, "cpp", cases=[{"stdin": "1"}] * 3)
    assert result.status == Status.COMPILE_ERROR
    assert "error" in result.message and result.cases == []


def test_python_batch_of_100_cases_each_with_fresh_scratch(judge):
    code = {
        "main.py": (
            "import os\n"
            "n = int(input())\n"
            "print(os.path.exists('/tmp/marker'), n * n)\n"
            "open('/tmp/marker', 'w').write('left behind')\n"
        )
    }
    cases = [{"stdin": str(i), "expected_stdout": f"False {i * i}"} for i in range(100)]
    result = judge.run(code, cases=cases)
    assert result.status == Status.SUCCESS, result
    assert result.summary == {"accepted": 100, "cases": 100, "success": 100}, result.summary


def test_no_case_sees_a_process_an_earlier_case_left_running(judge):
    """Plant and check in one lease: each case starts a detached sleeper, then the next case
    counts the sandbox user's other processes. The agent's handler and the next case's
    spare (root) survive between cases; nothing of the program's does."""
    code = {
        "main.py": (
            "import os, subprocess\n"
            "me = os.getuid()\n"
            "mine = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()\n"
            "        and os.stat('/proc/' + p).st_uid == me]\n"
            "print(len(mine))\n"
            "subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        )
    }
    result = judge.run(code, cases=[{"expected_stdout": "0"}] * 6)
    assert result.status == Status.SUCCESS, result
    assert result.summary == {"accepted": 6, "cases": 6, "success": 6}, result.cases


def test_large_stdin_travels_through_s3(judge):
    code = {"main.py": "import sys\nprint(len(sys.stdin.buffer.read()))"}
    two_mb = judge.run(code, stdin="x" * (2 << 20))
    assert two_mb.status == Status.SUCCESS, two_mb
    assert two_mb.stdout == f"{2 << 20}\n"
    top = get_settings().limits.max_stdin_bytes
    at_max = judge.run(code, stdin="y" * top)
    assert at_max.status == Status.SUCCESS and at_max.stdout == f"{top}\n", at_max


def test_over_a_maximum_is_refused_before_anything_is_sent(judge):
    top = get_settings().limits.max_stdin_bytes
    with pytest.raises(RunRejected, match="at most"):
        judge.submit({"main.py": "print(1)"}, stdin="z" * (top + 1))
    with pytest.raises(RunRejected, match="at most 100"):
        judge.submit({"main.py": "print(1)"}, cases=[{}] * 101)


def test_large_cases_travel_through_s3(judge):
    code = {"main.py": "import sys\nprint(len(sys.stdin.read()))"}
    cases = [{"stdin": "q" * 50_000, "expected_stdout": "50000"} for _ in range(20)]
    result = judge.run(code, cases=cases)  # ~1 MB of cases: over the inline threshold
    assert result.status == Status.SUCCESS, result
    assert result.summary["accepted"] == 20


def test_a_cases_document_at_its_maximum_runs_end_to_end(judge):
    """NANOGRID_MAX_CASES_BYTES (64 MiB) of cases, each stdin at most 8 MiB, through S3."""
    limits = get_settings().limits
    top, doc_max = limits.max_stdin_bytes, limits.max_cases_bytes
    sizes = [top] * (doc_max // top - 1)
    probe = [{"stdin": "a" * n} for n in sizes] + [{"stdin": ""}]
    sizes.append(doc_max - len(encode_cases(probe)))
    cases = [{"stdin": "a" * n} for n in sizes]
    assert len(encode_cases(cases)) == doc_max
    code = {"main.py": "import sys\nprint(len(sys.stdin.buffer.read()))"}
    result = judge.run(code, cases=cases, wait=300)
    assert result.status == Status.SUCCESS, result.message
    assert [c["stdout"] for c in result.cases] == [f"{n}\n" for n in sizes]
    with pytest.raises(RunRejected, match="as JSON; at most"):
        judge.submit(code, cases=[*cases[:-1], {**cases[-1], "stdin": "a" * (sizes[-1] + 1)}])


def test_batch_results_reach_the_result_stream(judge):
    import redis

    settings = get_settings()
    result = judge.run({"main.py": "print(input())"}, cases=[{"stdin": "s" * 1000}, {"stdin": "t"}])
    assert result.status == Status.SUCCESS
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    for _ in range(50):
        entries = r.xrevrange(settings.events_stream, count=200)
        found = [parse_entry(f) for _, f in entries if f.get("request_id") == result.request_id]
        if found:
            break
        time.sleep(0.1)
    (event,) = found
    assert event["summary"] == result.summary
    assert [len(c["stdout"]) for c in event["cases"]] == [256, 2] and event["output_cut"]


def test_two_workers_building_the_same_key_compile_once():
    """Two worker processes (different instance labels) share the host's cache directory."""
    tmp_path = _short_dir()
    workers = [
        WorkerProcess(f"cache{i}", pool_python=0, pool_cpp=1, work_root=str(tmp_path)).start()
        for i in range(2)
    ]
    try:
        code = {"main.cpp": _unique(JUDGE_CPP)}
        handles = [w.submit(code, "cpp", stdin="1") for w in workers]
        with cf.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda h: client.wait(h, timeout=120), handles))
        assert all(r.status == Status.SUCCESS and r.stdout == "2\n" for r in results), results
        assert sorted(r.compile_cached for r in results) == [False, True]
        assert len({r.worker for r in results}) == 2
        assert len(list((tmp_path / CACHE_DIR).glob("*.bin"))) == 1
    finally:
        for w in workers:
            w.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_batches_and_the_cache_work_with_the_exec_executor():
    root = _short_dir()
    w = WorkerProcess("batch-exec", pool_python=0, pool_cpp=1, executor="exec", work_root=str(root))
    w.start()
    try:
        code = {"main.cpp": _unique(JUDGE_CPP)}
        cases = [{"stdin": "4", "expected_stdout": "8"}, {"stdin": "-3", "expected_stdout": "-6"}]
        first = w.run(code, "cpp", cases=cases)
        assert first.status == Status.SUCCESS, first
        assert first.summary["accepted"] == 2 and first.compile_cached is False
        again = w.run(code, "cpp", cases=cases)
        assert again.summary["accepted"] == 2 and again.compile_cached is True
    finally:
        w.stop()
        shutil.rmtree(root, ignore_errors=True)
