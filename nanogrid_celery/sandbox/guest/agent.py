"""NanoGrid guest agent: runs programs inside a warm container without ``docker exec``.

Started as the container's command (root inside the container, stdlib only). It
listens on ``agent.sock`` in its own directory (``/run/nanogrid``, a host dir
with mode 0700, so the sandbox user can neither see nor connect to it) and
serves one JSON line per connection::

    {"op": "run", "argv": [...], "cwd": "/sandbox/code", "env": {...},
     "stdin": "/sandbox/stdin" | null, "timeout_ms": 10000,
     "stdout_max": 1048576, "stderr_max": 1048576, "uid": 65534, "gid": 65534,
     "mode": "exec" | "python"}

The reply is one JSON header line followed by ``stdout_len`` raw stdout bytes
and ``stderr_len`` raw stderr bytes (no base64 on the hot path).

Process layout, and why:

* The agent only accepts: each connection is served by a *handler* forked
  from it (a lease runs one program at a time, so one handler at a time),
  which exits after the run. So the agent's memory, the template every
  program is forked from, never holds a request, header, output or env: a
  run scanning its inherited memory found the previous run's header in it
  (issue 11). The handler is forked off the hot path (at ``prepare``).
* The handler forks the *program*, which drops to the sandbox user and either
  execs ``argv`` or, in ``python`` mode, runs ``main.py`` in the already
  initialised interpreter (the zygote: no ~20 ms interpreter start-up),
  mirroring ``python3 main.py``: argv, path, ``__main__``, exit codes,
  tracebacks. One fork per run: forks cost ~1 ms on our VMs.
* The agent pumps the program's pipes with caps, enforces the wall clock,
  kills every leftover sandbox-user process when the program exits, and
  replies. Output is read straight into buffers that are zeroed after every
  run, so the memory a later run inherits never holds an earlier run's output.

Leftovers are killed by ``kill(-1, SIGKILL)`` with the agent's *effective* uid
briefly the sandbox user's (``--kill-scope uid``): inside the container's pid
namespace that reaches exactly the sandbox user's processes and needs no
CAP_KILL. The real uid is then a uid nobody runs as and the saved uid root, so
no program can signal or ptrace the agent meanwhile (a killer that *was* the
sandbox user, a forked helper, could be SIGSTOPped by the program and held the
slot until the host gave up). The default scope, ``session``, kills only the
program's session: safe for running the agent directly on a host in tests.

After each run the agent counts the IPC objects in its (the container's) IPC
namespace (``/proc/sysvipc/*``, ``/dev/mqueue``: ~50 us) and reports ``ipc``;
only then does the host's reset sweep them (it has the capability, the agent
has none). Each run gets the request's rlimits (open files, file size,
stack; soft = hard).
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import gc
import json
import mmap
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
import types
from importlib.machinery import SourceFileLoader

SOCK_NAME = "agent.sock"
MAX_REQUEST = 1 << 20
CHUNK = 1 << 16
EXIT_GRACE_NS = 5_000_000_000  # a SIGKILLed program must be gone by then, else "dirty"
DRAIN_NS = 2_000_000_000  # pipes must reach EOF this long after the kill, else "dirty"
SETUP_FD = 3  # close-on-exec pipe: EOF = program started, bytes = why it could not
REQUEST_FD = 4  # a spare reads its request here
PIDS_FILES = ("/sys/fs/cgroup/pids/pids.current", "/sys/fs/cgroup/pids.current")
BASE_PROCS = 3  # container init + the agent + its handler
KILLER_RUID = 0x7FFFFFFE  # the kill's real uid: nobody's, so no program may signal the killer
SYSVIPC_FILES = ("/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem")
MQUEUE_DIR = "/dev/mqueue"
RLIMITS = {"nofile": resource.RLIMIT_NOFILE, "fsize": resource.RLIMIT_FSIZE}
RLIMITS["stack"] = resource.RLIMIT_STACK


# -- template ------------------------------------------------------------------------------
_SOCKETS: list[socket.socket] = []  # detached in the program, so it cannot close reused fds


def serve(ctl_dir: str, kill_scope: str, buffer_bytes: int) -> None:
    """Bind, announce readiness by renaming the socket into place, then serve one at a time."""
    path = os.path.join(ctl_dir, SOCK_NAME)
    tmp = f"{path}.{os.getpid()}"
    for stale in (tmp, path):
        if os.path.lexists(stale):
            os.unlink(stale)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _SOCKETS.append(srv)
    srv.bind(tmp)
    os.chmod(tmp, 0o600)
    srv.listen(16)
    gc.collect()
    gc.freeze()  # the template's objects stay out of the children's collections (fewer COW copies)
    os.rename(tmp, path)  # atomic: a visible socket always accepts
    while True:  # the agent itself never reads a request: its memory is every run's template
        conn, _ = srv.accept()
        try:
            handler = os.fork()
        except OSError as exc:
            _safe_reply(conn, {"ok": False, "error": f"agent cannot fork a handler: {exc!r}"})
            conn.close()
            continue
        if handler == 0:
            _SOCKETS.append(conn)
            _handle_until_done(srv, conn, kill_scope, buffer_bytes)  # never returns
        conn.close()
        _wait_quietly(handler)


def _handle_until_done(
    srv: socket.socket, conn: socket.socket, kill_scope: str, buffer_bytes: int
) -> None:
    """The handler: serves connections while it holds a spare, exits after a run without one.

    Everything a run leaves in Python memory (its request, header, stdin path,
    env) is in this process, which exits after the run: the next run forks from
    a handler forked from the agent, whose memory never held any of it. The
    handler waits for a connection only while it keeps a spare (``prepare``, or
    a compile step's ``prepare_next``: then the spare is the same submission's
    run step).
    """
    code = 0
    try:
        agent = Agent(kill_scope, Buffers(buffer_bytes))
        agent.exit_after_run = True
        while True:
            try:
                agent.handle(conn)
            except Exception as exc:  # one bad request must not take the agent down
                _safe_reply(conn, {"ok": False, "error": f"agent failure: {exc!r}"})
            finally:
                _SOCKETS.remove(conn)
                conn.close()
                agent.buffers.wipe()
            if agent.want_spare:
                agent.prepare()
            if agent.spare is None or not agent.spare.alive():
                break
            conn, _ = srv.accept()
            _SOCKETS.append(conn)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


class Agent:
    """Connection handling, plus the *spare*: the next run's process, forked ahead of time.

    A fork and the child's set-up (new session, fds, limits, and warming the
    pages a Python run writes first) cost ~2-3 ms here, so they are done between
    runs: ``{"op": "prepare"}`` (sent by the host after its reset, so the reset
    never sees a half-made process) or ``"prepare_next": true`` on a run that
    another step follows (compile, then run; one case of a batch, then the
    next). For ``prepare_next`` the spare is forked *before* the reply, so the
    host's reset between two cases (which keeps this handler and its spare)
    finds it already there, never appearing mid-sweep. The spare waits as root
    for its request on a pipe; a run without a spare forks on demand.
    """

    def __init__(self, kill_scope: str, buffers: Buffers) -> None:
        self.kill_scope = kill_scope
        self.buffers = buffers
        self.spare: Child | None = None
        self.want_spare = False
        self.exit_after_run = False  # set in a handler: its memory holds this run's data

    def handle(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, peer_uid, _ = struct.unpack("3i", creds)
        if peer_uid != os.getuid():
            _safe_reply(conn, {"ok": False, "error": "peer is not the agent's owner"})
            return
        conn.settimeout(10)
        req = json.loads(_read_line(conn))
        op = req.get("op", "run")
        if op == "ping":
            header = {"ok": True, "pid": os.getppid(), "python": sys.version.split()[0]}
            header["spare"] = self.spare.pid if self.spare else None
            _safe_reply(conn, header)
            return
        if op == "prepare":
            self.want_spare = True
            _safe_reply(conn, {"ok": True})
            return
        if op != "run":
            _safe_reply(conn, {"ok": False, "error": f"unknown op {op!r}"})
            return
        child = self.take_spare(req)
        header, out, err = run(req, self.kill_scope, self.buffers, child)
        header["stdout_len"], header["stderr_len"] = len(out), len(err)
        prepare_next = bool(req.get("prepare_next"))
        if prepare_next and header.get("ok") and not header.get("dirty"):
            # before the reply: the host's reset between two steps finds the spare already
            # there (a spare forked after it could appear mid-sweep and fail the check)
            self.prepare()
            header["spare"] = True
        conn.settimeout(30)
        _send_vectored(conn, [json.dumps(header).encode() + b"\n", out, err])
        if self.spare is None and self.exit_after_run:
            os._exit(0)  # at once: the host's reset should not find this handler still alive

    def prepare(self) -> None:
        self.want_spare = False
        if self.spare is None or not self.spare.alive():
            self.spare = _fork_child(None)

    def take_spare(self, req: dict) -> Child | None:
        """The spare, handed its request; None if there is none (or it was lost)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if spare.alive():
            try:
                spare.start(req)
                return spare
            except OSError:
                pass
        spare.discard()
        return None


def _read_line(conn: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = conn.recv(CHUNK)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return bytes(buf)


def _send_vectored(conn: socket.socket, parts: list) -> None:
    """One sendmsg for header + outputs, straight from the buffers (no copies)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = conn.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _safe_reply(conn: socket.socket, header: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(header).encode() + b"\n")


class Buffers:
    """Output buffers reused across runs, invisible to the programs, emptied after each run.

    The agent's memory is what every Python run inherits, so a run's output
    must never linger in it. Output is read with ``readv`` straight into
    private anonymous mappings marked ``MADV_DONTFORK`` (a forked program does
    not even have them mapped, and fork copies no page tables for them), never
    into short-lived ``bytes`` that would leave copies in freed heap memory;
    after each run ``MADV_DONTNEED`` hands the pages back, zeroed.
    """

    def __init__(self, size: int) -> None:
        self.out = _private_map(size)
        self.err = _private_map(size)
        self.scratch = _private_map(CHUNK)  # where output beyond the cap is read and dropped
        self.captures: list[Capture] = []

    def fit(self, out_cap: int, err_cap: int) -> None:
        if len(self.out) < out_cap:
            self.out = _private_map(out_cap)
        if len(self.err) < err_cap:
            self.err = _private_map(err_cap)

    def wipe(self) -> None:
        for capture in self.captures:
            if capture.kept:
                capture.buf.madvise(mmap.MADV_DONTNEED, 0, capture.kept)
            if capture.total > capture.kept:
                self.scratch.madvise(mmap.MADV_DONTNEED)
        self.captures.clear()


def _private_map(size: int) -> mmap.mmap:
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_DONTFORK)
    return buf


class Capture:
    """Keeps the first ``cap`` bytes of a stream in ``buf`` and counts all of them."""

    def __init__(self, buffers: Buffers, buf: mmap.mmap, cap: int) -> None:
        self.buffers, self.buf, self.cap = buffers, buf, cap
        self.kept = self.total = 0
        buffers.captures.append(self)

    def read_from(self, fd: int) -> bool:
        """Read what is ready; False at end of file."""
        if self.kept < self.cap:
            with memoryview(self.buf) as view:
                n = os.readv(fd, [view[self.kept : self.cap]])
            self.kept += n
        else:
            n = os.readv(fd, [self.buffers.scratch])
        self.total += n
        return n > 0

    def data(self) -> memoryview:
        return memoryview(self.buf)[: self.kept]


class Child:
    """A forked program-to-be: its pid and the agent's ends of its pipes."""

    def __init__(self, pid: int, out_r: int, err_r: int, setup_r: int, req_w: int | None) -> None:
        self.pid, self.req_w = pid, req_w
        self.out_r, self.err_r, self.setup_r = out_r, err_r, setup_r
        self.started = time.monotonic_ns()

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG)[0] == 0
        except ChildProcessError:
            return False

    def start(self, req: dict) -> None:
        """Hand a spare its request (it reads to EOF, then starts)."""
        assert self.req_w is not None
        self.started = time.monotonic_ns()
        data = json.dumps(req).encode()
        with memoryview(data) as view:
            while view:
                view = view[os.write(self.req_w, view) :]
        os.close(self.req_w)
        self.req_w = None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        _wait_quietly(self.pid)
        self.close()

    def close(self) -> None:
        for fd in (self.out_r, self.err_r, self.setup_r, self.req_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.out_r = self.err_r = self.setup_r = self.req_w = None


def _fork_child(req: dict | None) -> Child:
    """Fork a program: with ``req`` it starts at once, without it it waits as a spare."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    setup_r, setup_w = os.pipe()
    req_r, req_w = os.pipe() if req is None else (None, None)
    started = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        _program(req, out_w, err_w, setup_w, req_r)  # never returns
    for fd in (out_w, err_w, setup_w, req_r):
        if fd is not None:
            os.close(fd)
    child = Child(pid, out_r, err_r, setup_r, req_w)
    child.started = started  # a run's duration includes the fork it waited for
    return child


def run(
    req: dict, kill_scope: str, buffers: Buffers, child: Child | None = None
) -> tuple[dict, memoryview, memoryview]:
    """Start the program, pump its output, enforce the deadline, clean up, describe the end."""
    out_cap, err_cap = int(req["stdout_max"]), int(req["stderr_max"])
    buffers.fit(out_cap, err_cap)
    uid, gid = req.get("uid"), req.get("gid")
    if child is None:
        child = _fork_child(req)
    pid, started, out_r, err_r = child.pid, child.started, child.out_r, child.err_r
    setup_error = _read_all(child.setup_r)
    os.close(child.setup_r)
    killer = _Killer(kill_scope, pid, uid, gid)
    if setup_error:
        killer.kill()
        _wait_quietly(pid)
        for fd in (out_r, err_r):
            os.close(fd)
        error = {"ok": False, "error": setup_error.decode("utf-8", "replace")}
        return error, memoryview(b""), memoryview(b"")
    out = Capture(buffers, buffers.out, out_cap)
    err = Capture(buffers, buffers.err, err_cap)
    deadline = started + int(req["timeout_ms"]) * 1_000_000
    end = _pump(pid, {out_r: out, err_r: err}, deadline, killer)
    status, rusage = end["status"], end["rusage"]
    exit_code = sig = None
    if status is not None:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            exit_code = 128 + sig  # what `docker exec` reports, so both paths classify alike
        else:
            exit_code = os.waitstatus_to_exitcode(status)
    header = {
        "ok": True,
        "exit_code": exit_code,
        "signal": sig,
        "timed_out": end["timed_out"],
        "dirty": end["dirty"],
        "duration_ns": end["ended"] - started,
        "stdout_total": out.total,
        "stderr_total": err.total,
        "killed_leftovers": killer.used,
        "ipc": None if end["dirty"] else _ipc_objects(),
        "rusage": None
        if rusage is None
        else {
            "utime_ms": round(rusage.ru_utime * 1000, 3),
            "stime_ms": round(rusage.ru_stime * 1000, 3),
            "maxrss_kb": rusage.ru_maxrss,
        },
    }
    return header, out.data(), err.data()


def _read_all(fd: int) -> bytes:
    data = b""
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return data
        data += chunk


def _wait_quietly(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _pump(pid: int, caps: dict[int, Capture], deadline: int, killer: _Killer) -> dict:
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # no pidfd: poll waitpid every few ms instead
    status = rusage = None
    ended = 0
    timed_out = dirty = False
    give_up = None  # after the kill: by when everything must be over
    while caps or status is None:
        now = time.monotonic_ns()
        if status is None and not timed_out and now >= deadline:
            timed_out = True
            killer.kill()
            ended = now
            give_up = now + EXIT_GRACE_NS
        if give_up is not None and now >= give_up:
            dirty = True
            break
        waits = list(caps)
        if status is None and pidfd is not None:
            waits.append(pidfd)
        limit = (give_up if give_up is not None else deadline) - now
        if status is None and pidfd is None:
            limit = min(limit, 2_000_000)
        ready, _, _ = select.select(waits, [], [], max(0, limit) / 1e9)
        if status is None and (pidfd in ready or pidfd is None):
            done, st, ru = os.wait4(pid, os.WNOHANG)
            if done:
                status, rusage = st, ru
                if not timed_out:
                    ended = time.monotonic_ns()
                if pidfd is not None:
                    os.close(pidfd)
                    pidfd = None
                killer.kill_leftovers()
                give_up = time.monotonic_ns() + DRAIN_NS
        for fd in ready:
            if fd in caps and not caps[fd].read_from(fd):
                os.close(fd)
                del caps[fd]
    for fd in list(caps):
        os.close(fd)
    if pidfd is not None:
        os.close(pidfd)
    if status is None:
        killer.kill()
    return {
        "status": status,
        "rusage": rusage,
        "ended": ended or time.monotonic_ns(),
        "timed_out": timed_out,
        "dirty": dirty,
    }


class _Killer:
    """Kills what a run left behind: every sandbox-user process (uid scope) or its session."""

    def __init__(self, scope: str, pid: int, uid: int | None, gid: int | None) -> None:
        self.scope, self.pid, self.uid, self.gid = scope, pid, uid, gid
        self.used = False

    def kill_leftovers(self) -> None:
        """After the program exited: skip the kill when the cgroup shows nothing left."""
        if self.scope == "uid" and _pids_current() == BASE_PROCS:
            return
        self.kill()

    def kill(self) -> None:
        self.used = True
        if self.scope == "uid" and self.uid is not None and self.uid != os.getuid():
            self._kill_as_user()
        else:
            self._kill_session()

    def _kill_as_user(self) -> None:
        """Effective uid the sandbox user's (kill(-1) reaches exactly its processes), real uid
        nobody's and saved uid root: kill(-1) spares root's processes, no program may signal
        or ptrace us meanwhile (it matches neither our real nor saved uid), and the saved uid
        takes root back right after. No fork: nothing to stop, works under a fork bomb."""
        try:
            os.setresuid(KILLER_RUID, self.uid, 0)
            for _ in range(2):  # the second pass catches a fork that raced the first
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGKILL)
        finally:
            os.setresuid(0, 0, 0)

    def _kill_session(self) -> None:
        for _ in range(3):
            victims = [p for p in _session_members(self.pid) if p != os.getpid()]
            if not victims:
                return
            for victim in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)


def _ipc_objects() -> int | None:
    """SysV and POSIX IPC objects in this IPC namespace; None if they cannot be counted."""
    try:
        count = 0
        for path in SYSVIPC_FILES:
            with open(path, "rb") as fh:
                count += max(0, len(fh.read().splitlines()) - 1)  # minus the header line
        if os.path.isdir(MQUEUE_DIR):
            count += len(os.listdir(MQUEUE_DIR))
        return count
    except OSError:
        return None


def _pids_current() -> int | None:
    for path in PIDS_FILES:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            return int(os.read(fd, 64))
        finally:
            os.close(fd)
    return None


def _session_members(sid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "(comm)": state ppid pgrp session
            members.append(int(name))
    return members


# -- the program ---------------------------------------------------------------------------
def _program(req: dict | None, out_w: int, err_w: int, setup_w: int, req_r: int | None) -> None:
    """In the forked child: isolate, (as a spare: warm up and wait for the request), drop
    privileges, then exec or run main.py in-process. Never returns."""
    try:
        os.setsid()
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(setup_w, SETUP_FD, inheritable=False)
        if req_r is not None:
            os.dup2(req_r, REQUEST_FD, inheritable=False)
        for sock in _SOCKETS:  # forget the agent's sockets, so their fds cannot be closed later
            sock.detach()
        os.closerange(REQUEST_FD + (req_r is not None), os.sysconf("SC_OPEN_MAX"))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if req is not None:
            _set_rlimits(req)
        _raise_oom_score()
        if req is None:
            _warm_up()
            data = _read_all(REQUEST_FD)
            os.close(REQUEST_FD)
            if not data:  # discarded before use
                os._exit(0)
            req = json.loads(data)
            _set_rlimits(req)
        uid, gid = req.get("uid"), req.get("gid")
        if uid is not None and gid is not None:
            os.setgroups([gid])  # what `docker exec --user uid:gid` leaves
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
                raise OSError("privilege drop did not take")
        stdin_fd = os.open(req.get("stdin") or os.devnull, os.O_RDONLY)
        if stdin_fd != 0:
            os.dup2(stdin_fd, 0)
            os.close(stdin_fd)
        os.chdir(req["cwd"])
        argv, env = [str(a) for a in req["argv"]], {str(k): str(v) for k, v in req["env"].items()}
        env.setdefault("HOSTNAME", socket.gethostname())  # as `docker exec` adds
        env.setdefault("PWD", req["cwd"])  # as the shell that `docker exec` runs exports
        if req.get("mode") == "python":
            _run_python(argv, env, req["cwd"])
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python, not by exec'd code
            signal.signal(signum, signal.SIG_DFL)
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        try:
            os.write(SETUP_FD, f"cannot start {req.get('argv')!r}: {exc!r}".encode())
        finally:
            os._exit(127)


def _set_rlimits(req: dict) -> None:
    """The request's soft = hard limits (lowering needs no capability)."""
    for name, value in (req.get("rlimits") or {}).items():
        resource.setrlimit(RLIMITS[name], (int(value), int(value)))


def _warm_up() -> None:
    """Touch, before the request, the pages a run writes first (fork made them copy-on-write)."""
    json.loads('{"argv": ["python3", "main.py"], "env": {"A": "1"}, "n": 1, "b": true}')
    compile(b"import sys\nprint(sys.argv)\n", "/sandbox/code/main.py", "exec", dont_inherit=True)
    os.path.realpath("/")


def _raise_oom_score() -> None:
    """Make the program, not the agent, the OOM killer's first choice (raising needs no cap)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass


def _run_python(argv: list[str], env: dict[str, str], cwd: str) -> None:
    """Run ``argv[1]`` as ``python3 argv[1]`` would, in this pre-initialised interpreter."""
    path = os.path.abspath(os.path.join(cwd, argv[1]))
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(argv[1:])
    sys.orig_argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    sys.path[1:1] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]  # as python3
    sys.path_importer_cache.clear()
    main = types.ModuleType("__main__")
    main.__dict__.update(
        __file__=path,
        __cached__=None,
        __loader__=SourceFileLoader("__main__", path),
        __builtins__=builtins,
        __annotations__={},
    )
    sys.modules["__main__"] = main
    atexit._clear()
    with open(path, "rb") as fh:
        source = fh.read()
    os.close(SETUP_FD)  # from here on, anything that goes wrong is the program's own outcome
    exit_code, interrupted = 0, False
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:  # python3 prints these without a traceback
        exc.__traceback__ = None
        _print_uncaught(exc, None)
        _finish(1, False, main)
        return
    try:
        exec(code, main.__dict__)
    except SystemExit as exc:
        exit_code = _system_exit_code(exc)
    except BaseException as exc:  # the interpreter's top level
        if exc.__traceback__ is not None:  # drop this frame: python3 shows only the script's
            exc.__traceback__ = exc.__traceback__.tb_next
        _print_uncaught(exc, exc.__traceback__)
        exit_code, interrupted = 1, isinstance(exc, KeyboardInterrupt)
    _finish(exit_code, interrupted, main)


def _print_uncaught(exc: BaseException, tb: types.TracebackType | None) -> None:
    with contextlib.suppress(BaseException):
        sys.excepthook(type(exc), exc, tb)


def _system_exit_code(exc: SystemExit) -> int:
    """The interpreter's rule: None -> 0, an int -> itself, anything else is printed -> 1."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code if -(2**63) <= code < 2**63 else -1
    with contextlib.suppress(BaseException):
        print(code, file=sys.stderr)
    return 1


def _finish(exit_code: int, interrupted: bool, main: types.ModuleType) -> None:
    """Interpreter shutdown in miniature: threads, atexit, module teardown, flush, exit."""
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()
        for name in list(main.__dict__):  # finalizers of the script's globals run, as in python3
            if name != "__builtins__":
                main.__dict__[name] = None
        gc.collect()
    except SystemExit as exc:
        exit_code = _system_exit_code(exc)
    except BaseException as exc:
        _print_uncaught(exc, exc.__traceback__)
    for stream, failure_code in ((sys.stdout, 120), (sys.stderr, None)):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:  # python3 exits 120 when stdout cannot be flushed
            if failure_code is not None and exit_code == 0:
                exit_code = failure_code
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(exit_code & 0xFF)


# -- entry point ---------------------------------------------------------------------------
def main(args: list[str]) -> None:
    """``agent.py [--ctl DIR] [--kill-scope uid|session] [--buffer-bytes N]`` (no argparse:
    every module the agent imports is inherited by each Python run)."""
    opts = {
        "--ctl": os.path.dirname(os.path.abspath(__file__)),
        "--kill-scope": "session",
        "--buffer-bytes": str(1 << 20),
    }
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag not in opts:
            raise SystemExit(f"unknown option {flag}")
        opts[flag] = value
    if opts["--kill-scope"] not in ("uid", "session"):
        raise SystemExit("--kill-scope must be uid or session")
    serve(opts["--ctl"], opts["--kill-scope"], int(opts["--buffer-bytes"]))


if __name__ == "__main__":
    main(sys.argv[1:])
