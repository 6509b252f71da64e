"""The guest agent's protocol, run as a local subprocess (no Docker).

As root the agent drops each program to uid 65534 exactly as it does in a
container; otherwise programs run as the test's own user. The kill scope is
``session`` here: ``uid`` (kill(-1) as the sandbox user) is only safe inside a
container's pid namespace. Python runs are compared with a real ``python3
main.py`` run under the same interpreter, user, cwd and environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nanogrid_celery.sandbox.executors.agent import agent_call, agent_notify
from nanogrid_celery.sandbox.guest import agent as agent_module
from nanogrid_celery.sandbox.paths import ENV

AGENT = Path(agent_module.__file__)
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
ROOT = os.getuid() == 0
UID = 65534 if ROOT else None


def _world_readable_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="nanogrid-agent-test-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def agent():
    ctl = Path(tempfile.mkdtemp(prefix="nanogrid-agent-ctl-"))  # 0700, like the real one
    proc = subprocess.Popen(
        [PYTHON, "-u", "-B", str(AGENT), "--ctl", str(ctl), "--kill-scope", "session"],
        stdin=subprocess.DEVNULL,
        env={"LANG": "C.UTF-8", "HOME": "/tmp", "PATH": ENV["PATH"]},
    )
    sock = ctl / "agent.sock"
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, "agent exited during start-up"
        assert time.monotonic() < deadline, "agent socket did not appear"
        time.sleep(0.01)
    yield sock
    proc.kill()
    proc.wait(10)
    shutil.rmtree(ctl, ignore_errors=True)


@pytest.fixture
def code_dir():
    path = _world_readable_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def request(code_dir: Path, argv: list[str], mode: str = "exec", **over) -> dict:
    req = {
        "op": "run",
        "argv": argv,
        "cwd": str(code_dir),
        "env": ENV,
        "stdin": None,
        "timeout_ms": 10_000,
        "stdout_max": 1 << 20,
        "stderr_max": 1 << 20,
        "uid": UID,
        "gid": UID,
        "mode": mode,
    }
    req.update(over)
    return req


def call(sock: Path, req: dict, timeout: float = 30) -> tuple[dict, bytes, bytes]:
    return agent_call(sock, req, timeout)


def run_py(sock: Path, code_dir: Path, source: str, **over) -> tuple[dict, bytes, bytes]:
    main = code_dir / "main.py"
    main.write_text(source)
    main.chmod(0o644)
    return call(sock, request(code_dir, ["python3", "main.py"], "python", **over))


def real_python(code_dir: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """``python3 main.py`` as the sandbox would exec it: same interpreter, user, cwd, env."""
    kwargs = {"user": UID, "group": UID, "extra_groups": [UID]} if ROOT else {}
    return subprocess.run(
        [PYTHON, "main.py"],
        cwd=code_dir,
        env=ENV,
        input=stdin,
        capture_output=True,
        timeout=30,
        **kwargs,
    )


# -- protocol --------------------------------------------------------------------------------
def test_ping(agent):
    header, out, err = call(agent, {"op": "ping"})
    assert header["ok"] and header["pid"] > 0 and (out, err) == (b"", b"")


def test_unknown_op_and_garbage_are_errors_not_crashes(agent):
    assert call(agent, {"op": "nope"})[0]["ok"] is False
    header, _, _ = call(agent, {"op": "run"})  # missing fields
    assert header["ok"] is False and "agent failure" in header["error"]
    assert call(agent, {"op": "ping"})[0]["ok"]


def test_exec_mode_runs_a_program(agent, code_dir):
    header, out, err = call(
        agent, request(code_dir, ["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    )
    assert (header["exit_code"], header["signal"], header["timed_out"]) == (3, None, False)
    assert (out, err) == (b"hi\n", b"oops\n")
    assert header["duration_ns"] > 0 and header["rusage"]["maxrss_kb"] > 0


def test_missing_program_is_an_agent_error(agent, code_dir):
    header, _, _ = call(agent, request(code_dir, ["definitely-not-a-program"]))
    assert header["ok"] is False and "cannot start" in header["error"]


def test_stdin_is_the_requested_file(agent, code_dir):
    (code_dir / "stdin").write_bytes(b"from stdin\n")
    (code_dir / "stdin").chmod(0o644)
    header, out, _ = call(agent, request(code_dir, ["cat"], stdin=str(code_dir / "stdin")))
    assert (header["exit_code"], out) == (0, b"from stdin\n")
    header, out, _ = call(agent, request(code_dir, ["cat"]))  # no stdin: /dev/null
    assert (header["exit_code"], out) == (0, b"")


def test_output_is_capped_and_counted_and_binary_safe(agent, code_dir):
    script = "head -c 200000 /dev/zero; printf '\\377\\376' >&2"
    header, out, err = call(
        agent, request(code_dir, ["sh", "-c", script], stdout_max=1000, stderr_max=10)
    )
    assert header["exit_code"] == 0
    assert (len(out), header["stdout_total"]) == (1000, 200_000)
    assert (err, header["stderr_total"]) == (b"\xff\xfe", 2)


def test_timeout_kills_the_program(agent, code_dir):
    t0 = time.monotonic()
    header, _, _ = call(
        agent, request(code_dir, ["sh", "-c", "while :; do :; done"], timeout_ms=300)
    )
    assert header["timed_out"] and header["signal"] == 9 and header["exit_code"] == 137
    assert 0.29 <= header["duration_ns"] / 1e9 < 2
    assert time.monotonic() - t0 < 5


def test_leftover_processes_are_killed_when_the_program_exits(agent, code_dir):
    script = "sleep 60 & echo $!"
    header, out, _ = call(agent, request(code_dir, ["sh", "-c", script]))
    assert header["exit_code"] == 0 and header["killed_leftovers"]
    pid = int(out)
    deadline = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(pid), "the background sleep survived the run"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not ROOT, reason="privilege drop needs root")
def test_programs_run_as_the_sandbox_user_without_capabilities(agent, code_dir):
    script = "id -u; id -g; id -G; grep -E '^Cap(Eff|Prm)' /proc/self/status"
    _, out, _ = call(agent, request(code_dir, ["sh", "-c", script]))
    lines = out.decode().splitlines()
    assert lines[:3] == ["65534", "65534", "65534"]
    assert all(line.split()[1] == "0000000000000000" for line in lines[3:])


@pytest.mark.skipif(not ROOT, reason="peer check needs a second user")
def test_only_the_agents_owner_may_connect(agent):
    """The socket's directory already keeps others out; the peer check is the second wall."""
    os.chmod(agent, 0o666)
    os.chmod(agent.parent, 0o711)
    try:
        script = (
            "import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "try:\n"
            '    s.sendall(b\'{"op": "ping"}\\n\')\n'
            "except OSError:\n"
            "    pass  # the agent may answer and hang up before reading\n"
            "print(s.makefile('rb').readline().decode())\n"
        )
        res = subprocess.run(
            [PYTHON, "-c", script, str(agent)], user=65534, capture_output=True, timeout=10
        )
        assert b'"ok": false' in res.stdout and b"owner" in res.stdout, res
    finally:
        os.chmod(agent.parent, 0o700)
        os.chmod(agent, 0o600)


# -- python zygote ---------------------------------------------------------------------------
MIRRORED = {
    "hello": "print('hello')",
    "argv_path_main": (
        "import os, sys\n"
        "print(sys.argv, sys.path[0], __file__, __name__, __spec__, __package__, __cached__)\n"
        "print(sorted(k for k in globals() if k.startswith('__')))\n"
        "print(os.getcwd(), os.environ.get('PYTHONUNBUFFERED'), sys.flags.dont_write_bytecode)\n"
        "print(sys.stdout.encoding, sys.stdout.errors, sys.stdin.errors, sys.stderr.errors)\n"
        "print(os.getuid(), os.getgid(), sorted(os.getgroups()))\n"
    ),
    "exit_code": "import sys; print('bye'); sys.exit(3)",
    "exit_none": "raise SystemExit",
    "exit_message": "import sys; sys.exit('fatal: no input')",
    "exit_big": "import sys; sys.exit(256 + 7)",
    "uncaught": "def f():\n    raise ValueError('boom')\n\nprint('before')\nf()\n",
    "syntax_error": "print('unclosed'\n",
    "chained": "try:\n    1/0\nexcept Exception as e:\n    raise KeyError('k') from e\n",
    "keyboard_interrupt": "raise KeyboardInterrupt",
    "atexit_and_threads": (
        "import atexit, threading, time\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.1), print('thread done'))).start()\n"
        "print('main done')\n"
    ),
    "unflushed_file_object": "f = open(1, 'w', closefd=False)\nf.write('buffered')\n",
    "stdin": "import sys; data = sys.stdin.read(); print(repr(data), len(data))",
    "binary_out": "import sys; sys.stdout.buffer.write(bytes(range(256)))",
    "import_sibling": "import helper; print(helper.VALUE)",
    "signal_death": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
}


@pytest.mark.parametrize("name", sorted(MIRRORED))
def test_python_zygote_mirrors_python3_main_py(agent, code_dir, name):
    source = MIRRORED[name]
    (code_dir / "helper.py").write_text("VALUE = 42\n")
    (code_dir / "helper.py").chmod(0o644)
    stdin = b"line one\nline \xc3\xa9\n"
    (code_dir / "stdin").write_bytes(stdin)
    (code_dir / "stdin").chmod(0o644)
    header, out, err = run_py(agent, code_dir, source, stdin=str(code_dir / "stdin"))
    real = real_python(code_dir, stdin)
    expected_code = real.returncode if real.returncode >= 0 else 128 - real.returncode
    assert header["ok"], header
    assert (header["exit_code"], out, err) == (expected_code, real.stdout, real.stderr)


def test_zygote_timeout_and_exit_signal(agent, code_dir):
    header, _, _ = run_py(agent, code_dir, "while True: pass", timeout_ms=300)
    assert header["timed_out"] and header["exit_code"] == 137


def test_zygote_cannot_use_the_agents_sockets(agent, code_dir):
    source = (
        "import os\n"
        "fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
        "print([os.readlink(f'/proc/self/fd/{f}') for f in fds if f > 2 and f != fds[-1]])\n"
    )
    _, out, _ = run_py(agent, code_dir, source)
    assert out == b"[]\n"


def test_spare_process_runs_the_next_request(agent, code_dir):
    assert agent_notify(agent, {"op": "prepare"})
    deadline = time.monotonic() + 5
    while call(agent, {"op": "ping"})[0]["spare"] is None:
        assert time.monotonic() < deadline, "no spare was prepared"
        time.sleep(0.01)
    spare = call(agent, {"op": "ping"})[0]["spare"]
    header, out, _ = run_py(agent, code_dir, "import os; print(os.getpid())")
    assert header["exit_code"] == 0 and int(out) == spare
    assert call(agent, {"op": "ping"})[0]["spare"] is None


def test_a_run_cannot_find_an_earlier_runs_output_in_inherited_memory(agent, code_dir):
    """Output is read into non-inherited, zeroed buffers, never into the agent's heap."""
    digest = "import hashlib\nh = hashlib.sha256(b'nanogrid-secret').hexdigest().encode()\n"
    header, out, _ = run_py(agent, code_dir, digest + "import sys; sys.stdout.buffer.write(h * 8)")
    assert header["exit_code"] == 0 and len(out) == 512
    agent_notify(agent, {"op": "prepare"})
    search = digest + (  # h followed by h exists only if run 1's output is in this memory
        "import ctypes\n"
        "found = 0\n"
        "for line in open('/proc/self/maps').read().splitlines():\n"
        "    r = line.split()\n"
        "    if not r[1].startswith('r') or (len(r) > 5 and r[5].startswith('[v')):\n"
        "        continue\n"
        "    lo, hi = (int(x, 16) for x in r[0].split('-'))\n"
        "    data = ctypes.string_at(lo, hi - lo)\n"
        "    at = data.find(h)\n"
        "    while at != -1:\n"
        "        found += data[at + 64 : at + 128] == h\n"
        "        at = data.find(h, at + 1)\n"
        "print(found)\n"
    )
    header, out, err = run_py(agent, code_dir, search)
    assert header["exit_code"] == 0, err
    assert out == b"0\n", "a later run found an earlier run's output in its memory"


def test_zygote_puts_pythonpath_on_sys_path_where_python3_does(agent, code_dir):
    """A requirements environment is selected by PYTHONPATH: the forked child must see it
    exactly as ``python3 main.py`` does (after the script's dir, before the stdlib)."""
    site = code_dir / "site"
    (site / "ngpkg").mkdir(parents=True)
    (site / "ngpkg" / "__init__.py").write_text("VERSION = '1.0'\n")
    for path in (site, site / "ngpkg"):
        path.chmod(0o755)
    (site / "ngpkg" / "__init__.py").chmod(0o644)
    source = "import sys, ngpkg\nprint(ngpkg.VERSION, ngpkg.__file__)\nprint(sys.path)\n"
    env = ENV | {"PYTHONPATH": str(site)}
    header, out, err = run_py(agent, code_dir, source, env=env)
    (code_dir / "main.py").write_text(source)
    kwargs = {"user": UID, "group": UID, "extra_groups": [UID]} if ROOT else {}
    real = subprocess.run(
        [PYTHON, "main.py"], cwd=code_dir, env=env, capture_output=True, timeout=30, **kwargs
    )
    assert header["ok"] and header["exit_code"] == 0, (header, err)
    lines = out.decode().splitlines()
    assert lines[0].startswith("1.0 ")
    assert out.splitlines()[0] == real.stdout.splitlines()[0]
    zygote_path, real_path = eval(lines[1]), eval(real.stdout.decode().splitlines()[1])
    assert zygote_path[:2] == [str(code_dir), str(site)]
    assert zygote_path == real_path
    # nothing else removed: the next run without PYTHONPATH does not see it
    header, out, _ = run_py(agent, code_dir, "import sys\nprint(sys.path)\n")
    assert str(site) not in out.decode()


def test_the_kill_path_runs_as_no_uid_a_program_can_signal(monkeypatch):
    """kill(-1) with only the *effective* uid the sandbox user's: the real uid is nobody's and
    the saved uid root, so a program can neither SIGSTOP nor ptrace the killer; no helper is
    forked (a forked helper running as the sandbox user could be stopped and held the slot)."""
    calls: list[tuple] = []
    ids = {"r": 0, "e": 0, "s": 0}

    def setresuid(r: int, e: int, s: int) -> None:
        ids.update(r=r, e=e, s=s)
        calls.append(("setresuid", r, e, s))

    def kill(pid: int, sig: int) -> None:
        calls.append(("kill", pid, sig, ids["r"], ids["e"], ids["s"]))

    def fork() -> int:
        calls.append(("fork",))
        raise OSError("no fork in this test")

    monkeypatch.setattr(agent_module.os, "setresuid", setresuid)
    monkeypatch.setattr(agent_module.os, "kill", kill)
    monkeypatch.setattr(agent_module.os, "fork", fork)
    monkeypatch.setattr(agent_module.os, "getuid", lambda: 0)
    agent_module._Killer("uid", 12345, 65534, 65534).kill()
    kills = [c for c in calls if c[0] == "kill"]
    assert ("fork",) not in calls
    assert kills and all(c[1] == -1 and c[4] == 65534 for c in kills)
    assert all(c[3] not in (0, 65534) and c[5] == 0 for c in kills), kills
    assert calls[-1] == ("setresuid", 0, 0, 0)
