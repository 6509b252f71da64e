"""Issue 11 (container side): what one tenant does must never reach the next one.

Every test is an attack written as a PLANT run then a CHECK run on the *same*
container (pool of one per runtime: ``result.container_id`` is asserted equal),
under both executors where the container is shared the same way. Their fault
ends ``rejected``/``error``/``oom``/``timeout``, never ``internal_error``, and no
attack burns the pool: the module fixture asserts the number of our containers
after the suite equals the number before.
"""

from __future__ import annotations

import time
import uuid

import pytest

from nanogrid_celery.result import Status

from .harness import WorkerProcess

pytestmark = pytest.mark.integration

MiB = 1 << 20


def py(code: str, **files: str) -> dict[str, str]:
    return {"main.py": code, **files}


@pytest.fixture(scope="module")
def exec_worker():
    w = WorkerProcess("hostile-exec", concurrency=1, pool_python=1, pool_cpp=1, executor="exec")
    w.start()
    yield w
    w.stop()
    assert w.containers() == [], "worker shutdown left containers behind"


@pytest.fixture(scope="module")
def counted(worker, exec_worker):
    """Both workers, and the proof that no attack leaked or burnt a container."""
    workers = {"agent": worker, "exec": exec_worker}
    for w in workers.values():
        assert w.wait_pool_full(), "pool did not fill"
    before = {name: sorted(c.id for c in w.containers()) for name, w in workers.items()}
    yield workers
    for name, w in workers.items():
        assert w.wait_pool_full(), f"{name}: pool did not refill"
        time.sleep(1.0)  # a discard's background destroy and refill settle
        after = sorted(c.id for c in w.containers())
        assert len(after) == len(before[name]), f"{name}: containers {before[name]} -> {after}"


@pytest.fixture(params=["agent", "exec"])
def runner(request, counted):
    return counted[request.param]


def pair(w: WorkerProcess, plant: dict, check: dict, runtime: str = "python", **options):
    """Run ``plant`` then ``check`` on the same container; both results.

    An explicit memory limit (256 MiB unless given) keeps the tuner out: the
    scratch sizes these attacks hit follow the limit.
    """
    options.setdefault("memory_mb", 256)
    first = w.run(plant, runtime, **options)
    second = w.run(check, runtime, memory_mb=256)
    assert second.container_id == first.container_id, "the two runs must share a container"
    assert Status.INTERNAL_ERROR not in (first.status, second.status), (first, second)
    return first, second


# -- 1. a writable working directory, wiped with the run ------------------------------------
WORKDIR_PLANT = """
import fcntl, os, sqlite3
os.makedirs('sub/dir', exist_ok=True)
open('sub/dir/f.txt', 'w').write('planted')
db = sqlite3.connect('data.db')
db.execute('create table t (x)'); db.execute("insert into t values ('s3cr3t')"); db.commit()
with open('lock', 'w') as fh:
    fcntl.lockf(fh, fcntl.LOCK_EX)
print(sorted(os.listdir('.')), db.execute('select x from t').fetchone()[0], os.getcwd())
"""
WORKDIR_CHECK = """
import os
print(sorted(os.listdir('.')), open('main.py').read().strip())
"""


def test_working_directory_is_writable_and_wiped(runner):
    first, second = pair(runner, py(WORKDIR_PLANT), py(WORKDIR_CHECK))
    assert first.status == Status.SUCCESS, first
    assert first.stdout == "['data.db', 'lock', 'main.py', 'sub'] s3cr3t /sandbox/code\n"
    assert second.status == Status.SUCCESS, second
    assert second.stdout.startswith("['main.py'] import os"), second


def test_cpp_run_sh_builds_in_its_own_directory(runner):
    code = '#include <cstdio>\nint main(){ std::puts("built here"); }\n'
    script = "g++ -O0 -o prog main.cpp && ./prog && ls"
    first, second = pair(
        runner, {"run.sh": script, "main.cpp": code}, {"run.sh": "ls; ls /tmp"}, "cpp"
    )
    assert (first.status, first.stdout) == (Status.SUCCESS, "built here\nmain.cpp\nprog\nrun.sh\n")
    assert (second.status, second.stdout) == (Status.SUCCESS, "run.sh\n"), second


# -- 2. filling scratch space ends in ENOSPC, never in OOM -----------------------------------
FILL = """
import errno, os, sys
path = sys.argv[0] and {path!r}
written, chunk = 0, b'x' * (1 << 20)
try:
    with open(path, 'wb') as fh:
        while written < (2 << 30):
            fh.write(chunk); fh.flush(); written += len(chunk)
except OSError as exc:
    print(errno.errorcode[exc.errno], written >> 20)
else:
    print('NO ERROR', written >> 20)
"""


@pytest.mark.parametrize("path", ["/tmp/fill", "/dev/shm/fill", "fill"])
@pytest.mark.parametrize("memory_mb", [256, 64])
def test_filling_scratch_is_enospc_well_before_the_memory_limit(runner, path, memory_mb):
    first, second = pair(
        runner,
        py(FILL.format(path=path)),
        py("import os, shutil; print(shutil.disk_usage('.').used >> 20, os.listdir('/tmp'))"),
        memory_mb=memory_mb,
    )
    assert first.status == Status.SUCCESS, first
    code, mib = first.stdout.split()
    assert code in ("ENOSPC", "EDQUOT", "EFBIG"), first.stdout
    assert int(mib) <= memory_mb // 2, f"{mib} MiB written under a {memory_mb} MiB limit"
    assert second.status == Status.SUCCESS and second.stdout.endswith(" []\n"), second


INODES = """
import errno, os
made = 0
try:
    while made < 100_000:
        os.close(os.open({path!r} + '/f%d' % made, os.O_CREAT | os.O_WRONLY, 0o600))
        made += 1
except OSError as exc:
    print(errno.errorcode[exc.errno], made)
else:
    print('NO ERROR', made)
"""


@pytest.mark.parametrize("path", ["/tmp", "/dev/shm", "."])
def test_empty_files_are_bounded_too(runner, path):
    """Inodes cost kernel memory and reset time, not size: each mount bounds them."""
    first, second = pair(
        runner, py(INODES.format(path=path)), py("import os; print(len(os.listdir('/tmp')))")
    )
    assert first.status == Status.SUCCESS, first
    code, made = first.stdout.split()
    assert code == "ENOSPC" and int(made) <= 40_000, first.stdout
    assert (second.status, second.stdout) == (Status.SUCCESS, "0\n"), second


def test_every_writable_mount_is_bounded_memory(runner):
    """Nothing a program can write to is host disk, and every tmpfs has a size below the limit."""
    code = """
import os
bad = []
for line in open('/proc/self/mounts'):
    dev, mnt, fstype, opts = line.split()[:4]
    if 'rw' not in opts.split(',') or not os.access(mnt, os.W_OK):
        continue
    if fstype not in ('tmpfs', 'mqueue', 'devpts', 'proc', 'sysfs'):
        bad.append((mnt, fstype))
    if fstype == 'tmpfs':
        st = os.statvfs(mnt)
        if st.f_blocks * st.f_frsize > (128 << 20) + (8 << 20):
            bad.append((mnt, st.f_blocks * st.f_frsize))
for mnt in ('/run', '/var/tmp', '/var/run', '/home', '/root'):
    if os.path.isdir(mnt) and os.access(mnt, os.W_OK):
        bad.append(mnt)
print(bad)
"""
    result = runner.run(py(code), memory_mb=256)
    assert (result.status, result.stdout) == (Status.SUCCESS, "[]\n"), result


# -- 3. IPC objects do not survive the reset -------------------------------------------------
IPC_PLANT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
IPC_CREAT = 0o1000
shm = libc.shmget(0x5EC7E7, 160 << 20, IPC_CREAT | 0o666)
addr = libc.shmat(shm, None, 0)
ctypes.memset(addr, 0x41, 160 << 20)  # every page charged to the container
msg = libc.msgget(0x5EC7E8, IPC_CREAT | 0o666)
buf = ctypes.create_string_buffer(b'\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00s3cr3t')
libc.msgsnd(msg, buf, 6, 0)
sem = libc.semget(0x5EC7E9, 1, IPC_CREAT | 0o666)
rt = ctypes.CDLL('librt.so.1', use_errno=True)
mq = rt.mq_open(b'/planted', os.O_CREAT | os.O_RDWR, 0o666, None)
print(shm >= 0, msg >= 0, sem >= 0, mq >= 0)
"""
IPC_CHECK = """
import os
left = [l for f in ('shm', 'msg', 'sem') for l in open('/proc/sysvipc/' + f).readlines()[1:]]
print(len(left), os.listdir('/dev/mqueue'))
x = bytearray(200 << 20)  # fits a 256 MiB limit only if the planted 160 MiB is gone
for i in range(0, len(x), 4096):
    x[i] = 1
print('allocated')
"""


def test_ipc_objects_do_not_survive_the_reset(runner):
    first, second = pair(runner, py(IPC_PLANT), py(IPC_CHECK))
    assert (first.status, first.stdout) == (Status.SUCCESS, "True True True True\n"), first
    assert (second.status, second.stdout) == (Status.SUCCESS, "0 []\nallocated\n"), second


# -- 4. a later run cannot read the agent's memory of an earlier one -------------------------
HEAP_SCAN = """
import ctypes
# needles are built at run time, and a hit counts only in context the needle object itself
# (followed by a NUL) or this source cannot have: the header's next field, or the marker twice
needles = [(b'"exit_code": 1' + b'73', b', "'), (b'"stdout_total": 79' + b'19', b', "')]
marker = {marker_reversed!r}[::-1].encode()
needles.append((marker, marker))
found = set()
for line in open('/proc/self/maps').read().splitlines():
    r = line.split()
    if not r[1].startswith('r') or (len(r) > 5 and r[5].startswith('[v')):
        continue
    lo, hi = (int(x, 16) for x in r[0].split('-'))
    data = ctypes.string_at(lo, hi - lo)
    for i, (needle, after) in enumerate(needles):
        at = data.find(needle)
        while at != -1:
            end = at + len(needle)
            if data[end : end + len(after)] == after:
                found.add(i)
            at = data.find(needle, at + 1)
print(sorted(found))
"""


def test_next_run_cannot_read_the_previous_runs_header_or_output(counted):
    w = counted["agent"]
    marker = "mk" + uuid.uuid4().hex
    plant = py(f"import sys; sys.stdout.write(({marker!r} * 1000)[:7919]); sys.exit(173)")
    check = py(HEAP_SCAN.format(marker_reversed=marker[::-1]))
    first, second = pair(w, plant, check, stdin=marker * 10)
    assert first.status == Status.ERROR and first.exit_code == 173, first
    assert (second.status, second.stdout) == (Status.SUCCESS, "[]\n"), second


# -- 5. a crafted tree cannot crash the reset --------------------------------------------------
TREE_PLANT = """
import os
for top in ('/tmp', '/dev/shm', '.'):
    fd = os.open(top, os.O_RDONLY)
    for i in range(5000):
        name = 'd\\nx' if i % 7 else 'n' * 255
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
        if i % 1000 == 999:
            os.close(os.open('f\\n', os.O_CREAT | os.O_WRONLY, 0, dir_fd=fd))
    os.close(fd)
os.makedirs('/tmp/locked/inner'); os.chmod('/tmp/locked/inner', 0); os.chmod('/tmp/locked', 0)
for i in range(3000):
    open(f'/tmp/many-{i}', 'w').close()
print('planted')
"""


def test_deep_and_odd_trees_are_wiped(runner):
    check = py("import os; print(os.listdir('/tmp'), os.listdir('/dev/shm'), os.listdir('.'))")
    first, second = pair(runner, py(TREE_PLANT), check, timeout_ms=60_000)
    assert (first.status, first.stdout) == (Status.SUCCESS, "planted\n"), first
    assert (second.status, second.stdout) == (Status.SUCCESS, "[] [] ['main.py']\n"), second


# -- also: rlimits, and a kill path the program cannot stop ----------------------------------
RLIMITS = """
import resource as r
print([r.getrlimit(x) for x in (r.RLIMIT_NOFILE, r.RLIMIT_FSIZE, r.RLIMIT_STACK)])
"""


def test_runs_get_rlimits_for_files_size_and_stack(runner):
    result = runner.run(py(RLIMITS), memory_mb=256)
    nofile, fsize, stack = 1024, (64 + 4) * MiB, 64 * MiB
    expected = f"[({nofile}, {nofile}), ({fsize}, {fsize}), ({stack}, {stack})]\n"
    assert (result.status, result.stdout) == (Status.SUCCESS, expected), result


STOPPER = """
import os, signal, time
me = os.getuid()
for _ in range(8):
    if os.fork() == 0:
        mine = {os.getpid(), os.getppid()}
        end = time.time() + 5
        while time.time() < end:
            for name in os.listdir('/proc'):
                if name.isdigit() and int(name) not in mine:
                    try:
                        os.kill(int(name), signal.SIGSTOP)
                    except OSError:
                        pass
        os._exit(0)
time.sleep(0.2)
print('leaving stoppers behind')
"""


def test_a_program_cannot_stop_the_kill_path(counted):
    w = counted["agent"]
    for _ in range(3):
        t0 = time.monotonic()
        first, second = pair(w, py(STOPPER), py("print('next')"))
        assert first.status == Status.SUCCESS, first
        assert (second.status, second.stdout) == (Status.SUCCESS, "next\n"), second
        assert time.monotonic() - t0 < 8, "a stopped kill path held the slot"
