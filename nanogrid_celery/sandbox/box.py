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
The compile step goes through the host's build cache (``build_cache.py``):
a hit places the binary and skips g++.
"""

from __future__ import annotations

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.common.units import MB
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import InternalError, wrap
from nanogrid_celery.execution.runtimes import Plan
from nanogrid_celery.sandbox.build_cache import Build, BuildCache, build, build_key
from nanogrid_celery.sandbox.executors import Executor, Step
from nanogrid_celery.sandbox.lease import Lease, LeaseState
from nanogrid_celery.sandbox.limits import RunLimits
from nanogrid_celery.sandbox.outcome import Outcome, classify, compile_failure
from nanogrid_celery.sandbox.reset import Placed, reset_container
from nanogrid_celery.sandbox.scratch import rlimits, scratch_sizes
from nanogrid_celery.sandbox.staging import write_files

log = get_logger(__name__)
COMPILE_OUTPUT_CAP = 64 * 1024


class Sandbox:
    """Runs plans in leased containers with the given executor; see the module doc."""

    def __init__(self, settings: Settings, executor: Executor) -> None:
        self.settings = settings
        self.executor = executor
        self._builds: BuildCache | bool | None = False  # made on first use
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
        self.stage(lease, files, stdin, limits)
        with wrap(InternalError, "cgroup access failed", (OSError,)):
            built = self.build(lease, plan, files)
            if built.failure is not None:
                return built.failure  # type: ignore[return-value]
            outcome = self.run_step(lease, plan, limits)
            outcome.compile_ms = built.compile_ms
            outcome.compile_cached = built.cached if plan.compile else None
            return outcome

    def stage(
        self, lease: Lease, files: dict[str, bytes], stdin: bytes | None, limits: RunLimits
    ) -> None:
        """Code and stdin into a clean container, for one run or one case of a batch."""
        staged = sum(map(len, files.values())) + len(stdin or b"")
        sizes = scratch_sizes(limits.memory_bytes, staged)
        changed = {m: n for m, n in sizes.items() if lease.scratch_sizes.get(m) != n}
        if changed:  # the reset emptied them, so shrinking cannot fail for lack of room
            lease.in_namespaces(changed, sweep_ipc=False)
            lease.scratch_sizes.update(changed)
        lease.ipc_maybe = False  # each step says whether it may have left IPC objects
        write_files(lease, files, stdin, self.owner)

    @property
    def builds(self) -> BuildCache | None:
        """The host-wide build cache, made on first use (None when off or unusable)."""
        if self._builds is False:
            try:
                self._builds = BuildCache.from_settings(self.settings)
            except OSError as exc:
                log.warning("build cache unavailable: %s", exc)
                self._builds = None
        return self._builds  # type: ignore[return-value]

    def build(
        self, lease: Lease, plan: Plan, files: dict[str, bytes], keep_copy: bool = False
    ) -> Build:
        """The compile step through the build cache (sandbox/build_cache.py); a no-op without one.

        ``keep_copy``: also copy the binary out when there is no cache (a batch re-places it
        for every case, since each case starts from a wiped ``/tmp``).
        """
        if not plan.compile:
            return Build(None, None, False, None)
        if not plan.binary:  # not our own build: nothing is cached
            failure, ms = self._compile(lease, plan)
            return Build(failure, ms, False, None)
        lim = self.settings.limits
        attrs = getattr(lease.container, "attrs", None) or {}
        image = str(attrs.get("Image") or self.settings.image_for(lease.runtime))
        return build(
            self.builds,
            lease.root_view,
            plan.binary,
            build_key(files, plan.compile, image),
            lambda: self._compile(lease, plan),
            lim.compile_timeout_ms / 1000 + 5,
            self.settings.build_cache_max_binary_mb * MB,
            keep_copy,
        )

    def _compile(self, lease: Lease, plan: Plan) -> tuple[Outcome | None, float]:
        assert plan.compile
        cg = lease.cgroup
        lim = self.settings.limits
        lease.run_limits = None
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
        failure = compile_failure(res, cg.oom_kills() > ooms)
        if failure:
            failure.compile_ms = res.duration_ms
            failure.compile_cached = False
        return failure, res.duration_ms

    def run_step(
        self, lease: Lease, plan: Plan, limits: RunLimits, prepare_next: bool = False
    ) -> Outcome:
        """The program itself under ``limits``: classify, peak memory, CPU time.

        ``prepare_next``: another case of the same batch follows; the agent forks its
        process while the host resets (kept by :meth:`clean` with ``between_cases``).
        """
        cg = lease.cgroup
        if lease.run_limits is None or lease.run_limits[:2] != (limits.memory_bytes, limits.pids):
            cg.set_memory_limit(limits.memory_bytes)
            cg.set_pids_limit(limits.pids)
            applied = cg.memory_limit()  # read back: what the kernel enforces, not what we asked
            lease.run_limits = (limits.memory_bytes, limits.pids, applied)
        applied = lease.run_limits[2]
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
            prepare_next=prepare_next,
            rlimits=rlimits(limits.memory_bytes),
        )
        res = self.executor.start(lease, step)
        cpu1 = cg.cpu_ns()
        outcome = classify(res, cg.oom_kills() > ooms, limits)
        outcome.peak_memory_bytes = cg.peak_bytes()
        outcome.memory_limit_bytes = applied
        if cpu0 is not None and cpu1 is not None:
            outcome.cpu_time_ms = round((cpu1 - cpu0) / 1e6, 3)
        return outcome

    def reset(self, lease: Lease) -> None:
        """The verified reset (raises SandboxDirty), then the executor's own after-reset step."""
        lease.to(LeaseState.RESETTING)
        self.clean(lease)

    def clean(
        self, lease: Lease, between_cases: bool = False, keep_file: Placed | None = None
    ) -> bool:
        """The reset without a state change: also between two cases of a batch.

        ``between_cases``: the agent's handler and the spare it forked for the next case
        (``run_step(prepare_next=True)``) survive the sweep; nothing else does.
        ``keep_file``: see :func:`~nanogrid_celery.sandbox.reset.reset_container`.
        """
        keep_agent = between_cases and self.executor.keeps_spares
        kept = reset_container(
            self.settings, lease, between_cases, keep_agent=keep_agent, keep_file=keep_file
        )
        if not keep_agent:
            self.executor.after_reset(lease)
        return kept
