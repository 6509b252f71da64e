"""A request's dependencies: its ``requirements.txt`` turned into an environment to run with.

The runner calls :meth:`Dependencies.prepare` after the plan and before any
container is leased, so a requirement that cannot be built ends
``dependency_error`` (pip's reason in the message, nothing retried, no
container touched) and an invalid line ends ``rejected``. The environment
itself (build, cache, locks, eviction, mount) is ``sandbox/envs.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import NanoGridError
from nanogrid_celery.execution.requirements import REQUIREMENTS_FILE, parse_requirements
from nanogrid_celery.result import ExecutionResult
from nanogrid_celery.sandbox.envs import EnvHandle, EnvStore, Target, TargetProbe

log = get_logger(__name__)


class Dependencies:
    """Builds or finds the environment a python submission's requirements.txt asks for."""

    def __init__(
        self,
        settings: Settings,
        client_factory: Callable[[], object],
        *,
        store: EnvStore | None = None,
        target: Callable[[], Target] | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self.target = target or TargetProbe(settings, client_factory)
        self._lock = threading.Lock()

    @property
    def store(self) -> EnvStore:
        """Made on first use: a worker that never sees a requirements.txt creates no directory."""
        with self._lock:
            if self._store is None:
                self._store = EnvStore(self.settings)
            return self._store

    def prepare(
        self, runtime: str, files: dict[str, bytes], result: ExecutionResult
    ) -> EnvHandle | None:
        """The environment to run with (held until released), or None when none is asked for.

        Raises RunRejected for an invalid requirements.txt, DependencyError when it cannot
        be built.
        """
        if runtime != "python" or REQUIREMENTS_FILE not in files or not self.settings.deps_enabled:
            return None
        requirements = parse_requirements(
            files[REQUIREMENTS_FILE], self.settings.deps_max_requirements
        )
        if not requirements:
            return None
        handle = self.store.acquire(requirements, self.target())
        result.deps_env, result.deps_ms = handle.key, handle.ms
        log.info(
            "environment ready",
            env=handle.key,
            built=handle.built,
            deps_ms=handle.ms,
            requirements=requirements,
        )
        return handle

    def warm(self) -> threading.Thread | None:
        """Build ``NANOGRID_PREBUILT_ENVS`` in the background (``;`` between sets, ``,``
        between the lines of one set); the file locks make concurrent workers build each once."""
        sets = [s for s in self.settings.prebuilt_envs.split(";") if s.strip()]
        if not sets or not self.settings.deps_enabled:
            return None
        thread = threading.Thread(target=self._warm, args=(sets,), name="envs-warm", daemon=True)
        thread.start()
        return thread

    def _warm(self, sets: list[str]) -> None:
        for spec in sets:
            data = "\n".join(spec.split(",")).encode()
            try:
                requirements = parse_requirements(data, self.settings.deps_max_requirements)
                self.store.acquire(requirements, self.target()).release()
                log.info("prebuilt environment ready", requirements=requirements)
            except NanoGridError as exc:
                log.warning("prebuilt environment failed", spec=spec, error=str(exc))
