"""What happened in the container, before it becomes an ExecutionResult.

An executor reports one process as a :class:`ProcessResult` (exit code,
capped output, timed out, wall time); :func:`classify` turns the run step
into an :class:`Outcome` (success / error / timeout / oom with a message),
:func:`compile_failure` the compile step into a ``compile_error`` or nothing.
Both executors share these, so both give identical results (tested field by
field in tests/integration/test_fast_path.py).
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass, field

from nanogrid_celery.common.units import MB
from nanogrid_celery.result import Status
from nanogrid_celery.sandbox.limits import RunLimits
from nanogrid_celery.sandbox.output import CappedBuffer


@dataclass
class ProcessResult:
    """One process as an executor saw it."""

    exit_code: int | None
    stdout: CappedBuffer
    stderr: CappedBuffer
    timed_out: bool
    duration_ms: float


@dataclass
class Outcome:
    """What happened in the container, before it becomes an ExecutionResult."""

    status: Status
    message: str = ""
    exit_code: int | None = None
    signal: int | None = None
    stdout: CappedBuffer = field(default_factory=lambda: CappedBuffer(0))
    stderr: CappedBuffer = field(default_factory=lambda: CappedBuffer(0))
    duration_ms: float | None = None
    compile_ms: float | None = None
    compile_cached: bool | None = None
    peak_memory_bytes: int | None = None
    cpu_time_ms: float | None = None
    memory_limit_bytes: int | None = None


def compile_failure(res: ProcessResult, oom: bool) -> Outcome | None:
    """``compile_error`` with the compiler's message, or None if the build succeeded."""
    if res.timed_out:
        return Outcome(Status.COMPILE_ERROR, "compilation timed out")
    if oom:
        return Outcome(Status.COMPILE_ERROR, "the compiler ran out of memory")
    if res.exit_code == 0:
        return None
    text = (res.stderr.data + res.stdout.data).decode("utf-8", "replace").strip()
    return Outcome(
        Status.COMPILE_ERROR,
        f"compilation failed (exit {res.exit_code}):\n{text}",
        exit_code=res.exit_code,
        stdout=res.stdout,
        stderr=res.stderr,
    )


def classify(res: ProcessResult, oom: bool, limits: RunLimits) -> Outcome:
    """The run step's status: timeout beats OOM beats a non-zero exit."""
    out = Outcome(
        Status.SUCCESS,
        exit_code=res.exit_code,
        stdout=res.stdout,
        stderr=res.stderr,
        duration_ms=res.duration_ms,
    )
    code = res.exit_code
    if code is not None and code > 128:
        out.signal = code - 128
    if res.timed_out:
        out.status = Status.TIMEOUT
        out.message = f"wall-clock limit of {limits.timeout_ms} ms exceeded; process tree killed"
    elif oom:
        out.status = Status.OOM
        out.message = f"memory limit of {limits.memory_bytes // MB} MiB exceeded"
    elif code != 0:
        out.status = Status.ERROR
        if out.signal:
            out.message = f"killed by signal {signame(out.signal)}"
        else:
            out.message = f"exited with code {code}"
    return out


def signame(num: int) -> str:
    try:
        return _signal.Signals(num).name
    except ValueError:
        return str(num)
