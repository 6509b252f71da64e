"""What one run may use: the limits the sandbox enforces, in the one shape everyone passes.

:class:`~nanogrid_celery.config.Limits` holds the deployment's defaults and
maxima; :class:`RunLimits` is what one run gets after the request's own values
and the tuner's advice are applied. The result's ``limits`` field is
:meth:`RunLimits.as_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nanogrid_celery.common.units import MB


@dataclass(frozen=True)
class RunLimits:
    timeout_ms: int
    memory_bytes: int
    pids: int
    stdout_max_bytes: int
    stderr_max_bytes: int

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "memory_mb": self.memory_bytes // MB}
