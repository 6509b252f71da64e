"""What one run may write and hoard: scratch sizes and kernel-object limits from its memory limit.

Every writable path in a container is a tmpfs, and tmpfs pages are charged to
the container's memory cgroup: a tmpfs as large as the memory limit turns
"disk full" into an OOM kill (2 GiB written to ``/tmp`` under 256 MiB ended
``oom``). So the scratch budget follows the run's memory limit: in total half
of it, ``/sandbox`` (the writable working directory, plus room for the staged
code and stdin) a quarter, ``/tmp`` and ``/dev/shm`` an eighth each. A writer
meets ENOSPC while at least half the limit is still the program's own, and a
program that handles the error exits normally. Inodes are bounded too (one
per 2 KiB of size): a million empty files would cost kernel memory and a
long reset, not scratch size. Nothing writable is on host
disk (``/run/nanogrid`` is the agent's, mode 0700 root).

Per-run rlimits bound the kernel objects a program can hoard: open files
(1024), file size (the largest scratch mount: ENOSPC or EFBIG, never a
surprise), stack (64 MiB, within the memory limit anyway).
"""

from __future__ import annotations

from nanogrid_celery.common.units import MB

SANDBOX_MOUNT = "sandbox"  # relative to the container's root
TMP_MOUNT = "tmp"
SHM_MOUNT = "dev/shm"
SHARES = {SANDBOX_MOUNT: 4, TMP_MOUNT: 8, SHM_MOUNT: 8}  # 1/4, 1/8, 1/8 of the memory limit
STAGING_ROUND = 4 * MB  # room for code + stdin, rounded so that similar runs need no remount
MIN_SCRATCH = 1 * MB
NOFILE = 1024
STACK_BYTES = 64 * MB
INODE_BYTES = 2048  # one inode per 2 KiB of size: bounds kernel memory and the reset's work


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def scratch_sizes(memory_bytes: int, staged_bytes: int = 0) -> dict[str, int]:
    """tmpfs size of each writable mount for a run under ``memory_bytes``."""
    sizes = {m: max(MIN_SCRATCH, _round_up(memory_bytes // d, 4096)) for m, d in SHARES.items()}
    sizes[SANDBOX_MOUNT] += _round_up(max(staged_bytes, 1), STAGING_ROUND)
    return sizes


def tmpfs_data(size: int) -> str:
    """The tmpfs mount data for ``size`` bytes (also bounds inodes: empty files cost no size)."""
    return f"size={size // 1024}k,nr_inodes={max(1024, size // INODE_BYTES)}"


def rlimits(memory_bytes: int) -> dict[str, int]:
    """Soft = hard limits for a run (both executors apply the same)."""
    return {
        "nofile": NOFILE,
        "fsize": scratch_sizes(memory_bytes)[SANDBOX_MOUNT],
        "stack": min(STACK_BYTES, memory_bytes),
    }
