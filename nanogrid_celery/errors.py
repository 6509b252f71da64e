"""One exception tree: whose fault a failure is decides what happens next.

* :class:`RunRejected` - *their* fault (bad input, limits out of range, a
  submission that cannot be staged): the run ends ``rejected`` with the
  message; nothing is retried and no container is touched twice for it.
* :class:`InternalError` - *our* fault (Docker, S3, Redis, a container that
  broke): the runner retries once on a fresh container, then answers
  ``internal_error``. Its kinds say which part failed.

Library errors (docker-py, botocore, redis-py, OSError) are wrapped where
the library is called (epicbox's ``sandboxes.py`` does the same), with
:func:`wrap`, so the runner only ever catches this tree. Why it matters: on
the cold path ``create_container`` used to raise a bare ``RuntimeError`` when
the agent did not come up; that was not in the runner's retry tuple, so the
run ended "unexpected RuntimeError" without the retry a fresh container
would have given it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import docker.errors
import requests.exceptions


class NanoGridError(Exception):
    """Base of every error NanoGrid raises on purpose."""


class RunRejected(NanoGridError):
    """Bad input: the run ends as ``rejected`` with this message; nothing is retried."""


class DependencyError(NanoGridError):
    """The submission's requirements.txt could not be built into an environment (pip's reason
    in the message): the run ends ``dependency_error``, is not retried, leases no container."""


class InternalError(NanoGridError):
    """Our fault (Docker, S3, a broken container): retried once on a fresh container."""


class DockerUnavailable(InternalError):
    """The Docker daemon refused or could not be reached."""


class ContainerStartFailed(InternalError):
    """A container could not be created, started or its agent did not come up."""


class SandboxDirty(InternalError):
    """The container could not be verified clean; it must be destroyed, never reused."""


class AgentProtocolError(InternalError):
    """The agent could not be reached or answered nonsense: the container is not trusted."""


class StorageUnavailable(InternalError):
    """S3 could not be reached (after botocore's own retries)."""


#: what a Docker call can raise besides our own errors (requests' errors are OSErrors too)
DOCKER_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    OSError,
)


@contextmanager
def wrap(
    kind: type[InternalError],
    what: str,
    errors: tuple[type[BaseException], ...] = DOCKER_ERRORS,
) -> Iterator[None]:
    """Re-raise a library error from the block as ``kind("<what>: <error>")``.

    Our own errors pass through untouched, so nested wraps keep the innermost kind.
    """
    try:
        yield
    except NanoGridError:
        raise
    except errors as exc:
        raise kind(f"{what}: {exc}") from exc
