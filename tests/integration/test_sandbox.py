"""Issue #3: every run as isolated as a fresh container, every limit holds, every outcome named.

The session ``worker`` has one python and one cpp container, so consecutive
python runs land on the *same* container: what run 1 leaves behind, run 2
would see if the reset failed.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import uuid
import zipfile

import pytest

from nanogrid_celery import client
from nanogrid_celery.config import get_settings
from nanogrid_celery.execution.storage import upload
from nanogrid_celery.result import Status

pytestmark = pytest.mark.integration


def py(code: str) -> dict[str, str]:
    return {"main.py": code}


@pytest.mark.cgroups
def test_infinite_loop_times_out_and_container_is_reused(run):
    result = run(py("while True: pass"), timeout_ms=1000)
    assert result.status == Status.TIMEOUT, result
    assert "1000 ms" in result.message
    assert 900 <= result.duration_ms < 3000
    after = run(py("print('alive')"))
    assert (after.status, after.stdout) == (Status.SUCCESS, "alive\n")
    assert after.container_id == result.container_id


@pytest.mark.cgroups
def test_timeout_kills_the_whole_process_tree(run):
    code = (
        "import subprocess, time\n"
        "subprocess.Popen(['sleep', '300'])\n"
        "subprocess.Popen(['sh', '-c', 'while :; do :; done'])\n"
        "time.sleep(300)\n"
    )
    result = run(py(code), timeout_ms=800)
    assert result.status == Status.TIMEOUT
    check = run(
        py(
            "import os\n"
            "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "cmds = [open(f'/proc/{p}/cmdline', 'rb').read() for p in pids]\n"
            "print(sum(1 for c in cmds if b'300' in c or b'while' in c))"
        )
    )
    assert check.stdout == "0\n", check


@pytest.mark.cgroups
def test_memory_hog_is_oom(run):
    result = run(py("x = bytearray(400 * 1024 * 1024); print(len(x))"), memory_mb=64)
    assert result.status == Status.OOM, result
    assert "64 MiB" in result.message
    assert result.limits["memory_mb"] == 64
    assert run(py("print('ok')")).status == Status.SUCCESS


@pytest.mark.cgroups
def test_fork_bomb_is_contained(worker, run):
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    result = run(py(bomb), timeout_ms=2000)
    assert result.status in (Status.TIMEOUT, Status.ERROR), result
    after = run(py("print('survived')"))
    assert (after.status, after.stdout) == (Status.SUCCESS, "survived\n")
    assert worker.wait_pool_full()
    assert worker.proc.poll() is None


@pytest.mark.cgroups
def test_background_child_is_gone_in_next_run(run):
    marker = uuid.uuid4().hex
    first = run(
        py(
            "import subprocess\n"
            f"subprocess.Popen(['sh', '-c', 'sleep 600 # {marker}'], start_new_session=True,\n"
            "    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print('spawned')"
        )
    )
    assert first.status == Status.SUCCESS, first
    second = run(
        py(
            "import os\n"
            "found = 0\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n"
            f"        found += b'{marker}' in open(f'/proc/{{p}}/cmdline', 'rb').read()\n"
            "    except OSError:\n"
            "        pass\n"
            "print(found)"
        )
    )
    assert second.container_id == first.container_id
    assert second.stdout == "0\n", second


@pytest.mark.cgroups
def test_tmp_files_do_not_survive(run):
    first = run(
        py(
            "import os\n"
            "open('/tmp/secret.txt', 'w').write('s3cr3t')\n"
            "os.makedirs('/tmp/d/e', exist_ok=True); open('/tmp/d/e/f', 'w').write('x')\n"
            "open('/dev/shm/shm.txt', 'w').write('x')\n"
            "os.chmod('/tmp/d', 0)\n"
            "print('written')"
        )
    )
    assert first.status == Status.SUCCESS, first
    second = run(py("import os; print(sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')))"))
    assert second.container_id == first.container_id
    assert second.stdout == "[] []\n", second


def test_next_run_cannot_see_previous_code(run):
    secret = uuid.uuid4().hex
    first = run({"main.py": "print('one')", "secret.txt": secret})
    assert first.status == Status.SUCCESS
    second = run(
        py(
            "import os\n"
            "seen = []\n"
            "for root, dirs, files in os.walk('/sandbox'):\n"
            "    seen += [os.path.join(root, f) for f in files]\n"
            "print(seen)"
        )
    )
    assert second.container_id == first.container_id
    assert "secret.txt" not in second.stdout
    assert "/sandbox/code/main.py" in second.stdout


def test_network_is_unreachable(run):
    code = (
        "import socket\n"
        "for target in [('1.1.1.1', 53), ('127.0.0.1', 5000), ('172.17.0.1', 2375)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=2); print('connected', target)\n"
        "    except OSError as e:\n"
        "        print('refused')\n"
        "try:\n"
        "    socket.getaddrinfo('example.com', 80); print('resolved')\n"
        "except OSError:\n"
        "    print('no dns')\n"
    )
    result = run(py(code))
    assert result.stdout == "refused\nrefused\nrefused\nno dns\n", result


def test_filesystem_is_read_only_outside_scratch(run):
    # /sandbox/code is the run's writable working directory since issue 11 (test_hostile.py)
    code = (
        "import os\n"
        "for path in ['/sandbox/stdin', '/sandbox/x', '/etc/x', '/x', '/var/tmp/x', '/usr/x',\n"
        "             '/root/x', '/home/x']:\n"
        "    try:\n"
        "        open(path, 'w').write('x'); print('WROTE', path)\n"
        "    except OSError:\n"
        "        pass\n"
        "open('/tmp/ok', 'w').write('ok'); print('tmp ok')\n"
        "print(os.path.exists('/var/run/docker.sock'), os.path.exists('/run/docker.sock'))\n"
    )
    result = run(py(code))
    assert result.stdout == "tmp ok\nFalse False\n", result


def test_user_is_not_root_and_has_no_capabilities(run):
    code = (
        "import os\n"
        "print(os.getuid(), os.geteuid(), os.getgid())\n"
        "keys = ('CapEff', 'CapPrm', 'NoNewPrivs')\n"
        "caps = [l for l in open('/proc/self/status') if l.startswith(keys)]\n"
        "print(''.join(caps).split())\n"
    )
    result = run(py(code))
    lines = result.stdout.splitlines()
    assert lines[0] == "65534 65534 65534"
    assert "0000000000000000" in lines[1] and "NoNewPrivs:', '1'" in lines[1]


def test_huge_stdout_is_capped_and_worker_memory_stays_flat(worker, run):
    def worker_rss_kb() -> int:
        pids = subprocess.run(["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True)
        total = 0
        for pid in [worker.proc.pid, *map(int, pids.stdout.split())]:
            with open(f"/proc/{pid}/status") as fh:
                total += sum(int(ln.split()[1]) for ln in fh if ln.startswith("VmRSS:"))
        return total

    run(py("print('warm up')"))
    before = worker_rss_kb()
    result = run(
        py(
            "import sys\nchunk = 'x' * 65536\nfor _ in range(800): sys.stdout.write(chunk)\n"
            "sys.stderr.write('e' * 3_000_000)"
        ),
        timeout_ms=30000,
    )
    after = worker_rss_kb()
    assert result.status == Status.SUCCESS, result.message
    assert result.stdout_truncated and result.stderr_truncated
    assert len(result.stdout) == get_settings().limits.stdout_max_bytes
    assert len(result.stderr) == get_settings().limits.stderr_max_bytes
    assert after - before < 40_000, f"worker RSS grew by {after - before} kB"


def test_non_utf8_output_is_lossless(run):
    result = run(py("import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe bin')"))
    assert result.stdout_encoding == "base64"
    assert base64.b64decode(result.stdout) == b"ok \xff\xfe bin"
    assert run(py("print('caf\\u00e9')")).stdout == "café\n"


def test_killed_by_signal_is_reported(run):
    result = run(py("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    assert result.status == Status.ERROR
    assert result.signal == 11 and "SIGSEGV" in result.message


def test_cpp_runtime_is_hardened_too(run):
    code = (
        "#include <cstdio>\n#include <unistd.h>\n"
        'int main(){ FILE* f = fopen("/sandbox/x", "w"); '
        'printf("%d %d\\n", getuid(), f == nullptr); }\n'
    )
    result = run({"main.cpp": code}, "cpp")
    assert (result.status, result.stdout) == (Status.SUCCESS, "65534 1\n"), result


def test_cpp_infinite_loop_times_out(run):
    result = run(
        {"main.cpp": "int main(){ volatile long i=0; for(;;) i++; }"}, "cpp", timeout_ms=1000
    )
    assert result.status == Status.TIMEOUT
    assert run({"main.cpp": '#include <cstdio>\nint main(){puts("ok");}'}, "cpp").stdout == "ok\n"


# -- rejected input ----------------------------------------------------------------------


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


BOMB = [("main.py", b"print(1)"), ("zeros.bin", b"\0" * (100 * 1024 * 1024))]

REJECTED_ZIPS = {
    "absolute path": [("main.py", b"print(1)"), ("/etc/evil", b"x")],
    "dot-dot": [("main.py", b"print(1)"), ("../../evil.py", b"x")],
    "symlink": [("main.py", b"print(1)"), _symlink("link", "/etc/passwd")],
    "zip bomb": BOMB,
    "no main file": [("other.py", b"print(1)")],
}


@pytest.mark.parametrize("case", sorted(REJECTED_ZIPS))
def test_hostile_zip_is_rejected(worker, case):
    settings = get_settings()
    key = f"hostile/{uuid.uuid4().hex}/code.zip"
    client._bucket_ready(settings)
    upload(settings, key, _zip(REJECTED_ZIPS[case]))
    result = client.wait(
        client.enqueue(
            f"rej-{uuid.uuid4().hex}", "python", settings.s3_bucket, key, queue=worker.queue
        ),
        timeout=60,
    )
    assert result.status == Status.REJECTED, (case, result)
    assert result.message


@pytest.mark.parametrize(
    ("runtime", "options", "needle"),
    [
        ("cobol", {}, "unknown runtime"),
        ("python", {"timeout_ms": 0}, "timeout_ms"),
        ("python", {"timeout_ms": 10**9}, "timeout_ms"),
        ("python", {"memory_mb": 1}, "memory_mb"),
        ("python", {"memory_mb": 10**6}, "memory_mb"),
        ("python", {"timeout_ms": "soon"}, "timeout_ms"),
    ],
)
def test_bad_parameters_are_rejected(run, runtime, options, needle):
    result = run(py("print(1)"), runtime, **options)
    assert result.status == Status.REJECTED
    assert needle in result.message


def test_empty_and_oversized_code_is_rejected(run, tmp_path):
    empty = tmp_path / "main.py"
    empty.write_bytes(b"")
    assert run(empty).status == Status.REJECTED
    big = tmp_path / "big.py"
    big.write_bytes(b"#" * (get_settings().limits.max_code_bytes + 1))
    result = run(big)
    assert result.status == Status.REJECTED and "at most" in result.message


@pytest.mark.cgroups
def test_container_count_is_unchanged(worker):
    assert worker.wait_pool_full()
    containers = worker.containers()
    assert len(containers) == worker.pool_target, [c.name for c in containers]
    assert os.path.isdir(get_settings().work_root)
