"""Issue #4: the agent fast path gives the same results as ``docker exec``, with no Docker call.

Two real workers side by side - one per executor - run the same submissions;
every field a client sees (status, exit code, signal, output, flags, message)
must match. Python programs run in the agent's pre-initialised interpreter, so
exit codes and tracebacks are compared with real ``python3 main.py`` runs.
"""

from __future__ import annotations

import time

import pytest

from nanogrid_celery.result import ExecutionResult, Status

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

HELLO_CPP = '#include <iostream>\nint main(){ std::cout << "hello cpp" << std::endl; }\n'
FIELDS = (
    "status",
    "exit_code",
    "signal",
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "stdout_encoding",
    "stderr_encoding",
    "message",
)

CASES: dict[str, tuple[dict[str, str], str, dict]] = {
    "python hello": ({"main.py": "print('hello python')"}, "python", {}),
    "stdin": ({"main.py": "import sys; print(sys.stdin.read().upper())"}, "python", {"stdin": "a"}),
    "exit code": (
        {"main.py": "import sys; print('x', file=sys.stderr); sys.exit(3)"},
        "python",
        {},
    ),
    "exit message": ({"main.py": "raise SystemExit('bad input')"}, "python", {}),
    "traceback": (
        {"main.py": "import helper\nhelper.go()\n", "helper.py": "def go():\n    return 1/0\n"},
        "python",
        {},
    ),
    "syntax error": ({"main.py": "def f(:\n    pass\n"}, "python", {}),
    "keyboard interrupt": ({"main.py": "raise KeyboardInterrupt"}, "python", {}),
    "signal": (
        {"main.py": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"},
        "python",
        {},
    ),
    "identity": (
        {
            "main.py": (
                "import os, sys\n"
                "print(sys.argv, sys.path[0], __file__, __name__, os.getcwd())\n"
                "print(os.getuid(), os.getgid(), os.getgroups(), sorted(os.environ))\n"
                "print(sys.stdout.encoding, sys.stdout.errors, sys.flags.dont_write_bytecode)\n"
            )
        },
        "python",
        {},
    ),
    "non-utf8": (
        {"main.py": "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe')"},
        "python",
        {},
    ),
    "capped": (
        {"main.py": "import sys\nfor _ in range(40): sys.stdout.write('y' * 65536)\n"},
        "python",
        {},
    ),
    "timeout": (
        {"main.py": "print('started', flush=True)\nwhile True: pass"},
        "python",
        {"timeout_ms": 500},
    ),
    "oom": ({"main.py": "x = bytearray(300 * 1024 * 1024)"}, "python", {"memory_mb": 64}),
    "cpp hello": ({"main.cpp": HELLO_CPP}, "cpp", {}),
    "cpp compile error": ({"main.cpp": "int main( { return 0 }"}, "cpp", {}),
    "cpp exit code": ({"main.cpp": "#include <cstdlib>\nint main(){ std::exit(7); }"}, "cpp", {}),
    "run.sh": ({"run.sh": "echo from-run-sh; echo $((6*7)); exit 2"}, "c++", {}),
}


@pytest.fixture(scope="module")
def workers():
    started = {}
    try:
        for executor in ("exec", "agent"):
            started[executor] = WorkerProcess(
                f"fast-{executor}", concurrency=1, pool_python=1, pool_cpp=1, executor=executor
            ).start()
        yield started
    finally:
        for w in started.values():
            w.stop()
    for w in started.values():
        assert w.containers() == [], "worker shutdown left containers behind"


def _view(result: ExecutionResult) -> dict:
    return {name: getattr(result, name) for name in FIELDS}


@pytest.mark.parametrize("case", sorted(CASES))
def test_agent_results_match_docker_exec(workers, case):
    files, runtime, options = CASES[case]
    exec_result = workers["exec"].run(files, runtime, **options)
    agent_result = workers["agent"].run(files, runtime, **options)
    assert exec_result.status not in (Status.INTERNAL_ERROR, Status.REJECTED), exec_result
    assert _view(agent_result) == _view(exec_result)
    if agent_result.status != Status.COMPILE_ERROR:
        assert agent_result.duration_ms is not None and agent_result.duration_ms > 0
    assert agent_result.attempts == 1


def test_tracebacks_look_like_python3(workers):
    result = workers["agent"].run({"main.py": "def f():\n    raise ValueError('boom')\n\nf()\n"})
    assert result.exit_code == 1
    assert result.stderr == (
        "Traceback (most recent call last):\n"
        '  File "/sandbox/code/main.py", line 4, in <module>\n'
        "    f()\n"
        '  File "/sandbox/code/main.py", line 2, in f\n'
        "    raise ValueError('boom')\n"
        "ValueError: boom\n"
    )


def test_warm_runs_make_no_docker_api_calls():
    """Back-to-back runs inside the pause grace period: no exec, no pause, no unpause."""
    w = WorkerProcess(
        "fast-quiet",
        concurrency=1,
        pool_python=1,
        pool_cpp=0,
        executor="agent",
        pause_grace_ms=5000,
    ).start()
    try:
        first = w.run({"main.py": "print(1)"})  # unpauses the pooled container
        time.sleep(1.1)  # docker events have one-second resolution
        since = int(time.time())
        results = [w.run({"main.py": f"print({i})"}) for i in range(5)]
        until = int(time.time()) + 1
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]
        assert {r.container_id for r in results} == {first.container_id}
        events = w.docker.events(
            since=since,
            until=until,
            decode=True,
            filters={"label": [f"nanogrid.instance={w.instance}"], "type": "container"},
        )
        actions = [e.get("Action", "") for e in events]
        assert not [a for a in actions if a.startswith("exec_") or a in ("pause", "unpause")]
        assert w.wait_pool_full(timeout=20), "the idle container is paused after the grace"
    finally:
        w.stop()
    assert w.containers() == []
