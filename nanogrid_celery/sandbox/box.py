"""Run one plan in a leased container: stage, limit, [compile], run, measure; then reset.

Executor-independent (the executor only starts processes), so ``agent`` and
``exec`` give identical results. Limits are written straight to the
container's cgroup files (~13 us a file, against 1-2 s for ``stats()`` and
~30 ms for ``update()``); the applied memory limit is read back, so a result
says what the kernel enforced, not what we asked. Per-run peak memory is
reset before the run step; OOM is the cgroup's ``oom_kill`` counter (an exec'd
process killed by the limit leaves ``State.OOMKilled`` false); CPU time is
the cgroup's usage delta. The writable mounts are resized to the run's
memory limit before staging (``scratch.py``; a remount only when the size
changes, ~4-10 ms, so runs under an unchanged limit never pay it), and each
step carries the run's rlimits.
"""

from __future__ import annotations

from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import InternalError, wrap
from nanogrid_celery.execution.runtimes import Plan
from nanogrid_celery.sandbox.executors import Executor, Step
from nanogrid_celery.sandbox.lease import Lease, LeaseState
from nanogrid_celery.sandbox.limits import RunLimits
from nanogrid_celery.sandbox.outcome import Outcome, classify, compile_failure
from nanogrid_celery.sandbox.reset import reset_container
from nanogrid_celery.sandbox.scratch import rlimits, scratch_sizes
from nanogrid_celery.sandbox.staging import write_files

COMPILE_OUTPUT_CAP = 64 * 1024


class Sandbox:
    """Runs plans in leased containers with the given executor; see the module doc."""

    def __init__(self, settings: Settings, executor: Executor) -> None:
        self.settings = settings
        self.executor = executor
        uid, _, gid = settings.sandbox_user.partition(":")
        self.owner = int(uid), int(gid or uid)

    def run(
        self,
        lease: Lease,
        plan: Plan,
        files: dict[str, bytes],
        stdin: bytes | None,
        limits: RunLimits,
    ) -> Outcome:
        lease.to(LeaseState.RUNNING)
        staged = sum(map(len, files.values())) + len(stdin or b"")
        sizes = scratch_sizes(limits.memory_bytes, staged)
        changed = {m: n for m, n in sizes.items() if lease.scratch_sizes.get(m) != n}
        if changed:  # the reset emptied them, so shrinking cannot fail for lack of room
            lease.in_namespaces(changed, sweep_ipc=False)
            lease.scratch_sizes.update(changed)
        lease.ipc_maybe = False  # each step says whether it may have left IPC objects
        write_files(lease, files, stdin, self.owner)
        with wrap(InternalError, "cgroup access failed", (OSError,)):
            return self._run(lease, plan, limits)

    def _run(self, lease: Lease, plan: Plan, limits: RunLimits) -> Outcome:
        cg = lease.cgroup
        compile_ms = None
        if plan.compile:
            lim = self.settings.limits
            cg.set_memory_limit(lim.compile_memory_mb * MB)
            ooms = cg.oom_kills()
            step = Step(
                plan.compile,
                lim.compile_timeout_ms,
                COMPILE_OUTPUT_CAP,
                COMPILE_OUTPUT_CAP,
                stdin=False,
                prepare_next=True,  # the run step follows: the agent forks a spare for it now
                rlimits=rlimits(lim.compile_memory_mb * MB),
            )
            res = self.executor.start(lease, step)
            compile_ms = res.duration_ms
            failure = compile_failure(res, cg.oom_kills() > ooms)
            if failure:
                failure.compile_ms = compile_ms
                return failure
        cg.set_memory_limit(limits.memory_bytes)
        cg.set_pids_limit(limits.pids)
        applied = cg.memory_limit()  # read back: what the kernel enforces, not what we asked
        cg.reset_peak()
        ooms = cg.oom_kills()
        cpu0 = cg.cpu_ns()
        step = Step(
            plan.run,
            limits.timeout_ms,
            limits.stdout_max_bytes,
            limits.stderr_max_bytes,
            True,
            env=plan.env or None,
            rlimits=rlimits(limits.memory_bytes),
        )
        res = self.executor.start(lease, step)
        cpu1 = cg.cpu_ns()
        outcome = classify(res, cg.oom_kills() > ooms, limits)
        outcome.compile_ms = compile_ms
        outcome.peak_memory_bytes = cg.peak_bytes()
        outcome.memory_limit_bytes = applied
        if cpu0 is not None and cpu1 is not None:
            outcome.cpu_time_ms = round((cpu1 - cpu0) / 1e6, 3)
        return outcome

    def reset(self, lease: Lease) -> None:
        """The verified reset (raises SandboxDirty), then the executor's own after-reset step."""
        lease.to(LeaseState.RESETTING)
        reset_container(self.settings, lease)
        self.executor.after_reset(lease)
