"""Build the sandbox runtime images offline, with ``mmdebstrap`` piped into ``docker import``.

Why not ``docker build``: a plain ``FROM debian`` needs a registry, and NanoGrid must come
up on machines that can reach only the Debian mirror. ``mmdebstrap`` builds a minimal
bookworm root filesystem straight from the mirror and streams it as a tarball on stdout,
which ``docker import`` turns into a one-layer image. The Dockerfiles under ``images/``
are the equivalent for users who do have a registry.

The import is untagged at first; the tag moves to the new image only after a smoke test
inside it passed, so a failed or half-finished build never leaves a broken image under the
tag that :func:`image_exists` (and therefore the worker) would trust.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import docker
import docker.errors
from docker.utils import parse_repository_tag
from rich.console import Console
from rich.markup import escape

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings

__all__ = [
    "RUNTIMES",
    "ImageBuildError",
    "build_images",
    "image_exists",
    "import_argv",
    "mmdebstrap_argv",
]

SUITE = "bookworm"
# mmdebstrap unpacks ~500 MB of packages; /tmp is often a small tmpfs, /var/tmp is real disk.
SCRATCH_BASE = "/var/tmp"
STDERR_TAIL_LINES = 30

# The cpp image carries python3 too: the in-container agent that drives compile+run is Python.
RUNTIME_PACKAGES: dict[str, tuple[str, ...]] = {
    "python": ("python3",),
    "cpp": ("python3", "g++"),
}
RUNTIMES: tuple[str, ...] = tuple(RUNTIME_PACKAGES)

# Smoke tests run inside the fresh image (no network) before it gets its tag.
VERIFY_COMMANDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "python": (("python3", "-c", "print(1)"),),
    "cpp": (("python3", "-c", "print(1)"), ("g++", "--version")),
}

# Docs, man pages and translations are dead weight in a sandbox (~30% of the image).
DPKG_EXCLUDES: tuple[str, ...] = (
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
)

INSTALL_HINT = "install it with: apt-get install -y mmdebstrap"
_STAGE_RE = re.compile(r"^([IWE]): (.*)$")
log = get_logger(__name__)


class ImageBuildError(RuntimeError):
    """A runtime image could not be built; the message says why (and how to fix it if known)."""


@dataclass
class _Pipeline:
    """Outcome of one mmdebstrap | docker import run."""

    image_id: str
    stderr_tail: list[str]


def image_exists(client: docker.DockerClient, tag: str) -> bool:
    """True if ``tag`` resolves to a local image (the worker never pulls, so local is all)."""
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def mmdebstrap_argv(runtime: str, mmdebstrap: str = "mmdebstrap") -> list[str]:
    """The mmdebstrap command for ``runtime``; ``-`` as target streams a tarball to stdout."""
    packages = _packages(runtime)
    return [
        mmdebstrap,
        "--variant=essential",
        "--include=" + ",".join(packages),
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES),
        SUITE,
        "-",
    ]


def import_argv(runtime: str, docker_bin: str = "docker") -> list[str]:
    """The docker import command; no tag, so it prints the new image ID for us to verify first."""
    _packages(runtime)
    return [docker_bin, "import", "--change", f"LABEL nanogrid.image={runtime}", "-"]


def build_images(
    settings: Settings,
    *,
    force: bool = False,
    runtimes: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, str]:
    """Build the runtime images that are missing (all of them with ``force``).

    Returns ``{runtime: "built" | "exists"}``. Raises :class:`ImageBuildError` if a
    prerequisite is missing or a build fails; images built before the failure are kept.
    """
    console = console or Console(stderr=True)
    selected = list(runtimes) if runtimes is not None else list(RUNTIMES)
    for runtime in selected:
        _packages(runtime)

    client = _docker_client()
    results: dict[str, str] = {}
    todo: list[str] = []
    for runtime in selected:
        tag = settings.image_for(runtime)
        if not force and image_exists(client, tag):
            console.print(f"[green]✓[/] {runtime}: {escape(tag)} already exists (force to rebuild)")
            results[runtime] = "exists"
        else:
            todo.append(runtime)
    if not todo:
        return results

    mmdebstrap, docker_bin = _require_tools()
    for runtime in todo:
        _build_one(client, settings.image_for(runtime), runtime, mmdebstrap, docker_bin, console)
        results[runtime] = "built"
    return results


def _packages(runtime: str) -> tuple[str, ...]:
    try:
        return RUNTIME_PACKAGES[runtime]
    except KeyError:
        known = ", ".join(RUNTIMES)
        raise ValueError(f"unknown runtime {runtime!r} (known: {known})") from None


def _docker_client() -> docker.DockerClient:
    """Connect and ping now, so an unreachable daemon fails before a minute of mmdebstrap."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ImageBuildError(
            f"cannot reach the Docker daemon ({exc}); is dockerd running and is "
            "/var/run/docker.sock (or DOCKER_HOST) accessible to this user?"
        ) from exc
    return client


def _require_tools() -> tuple[str, str]:
    """Resolve mmdebstrap and the docker CLI up front, with an actionable message if absent."""
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise ImageBuildError(f"mmdebstrap is not installed; {INSTALL_HINT}")
    docker_bin = shutil.which("docker")
    if docker_bin is None:
        raise ImageBuildError("the docker CLI is not on PATH (needed for `docker import`)")
    return mmdebstrap, docker_bin


def _build_one(
    client: docker.DockerClient,
    tag: str,
    runtime: str,
    mmdebstrap: str,
    docker_bin: str,
    console: Console,
) -> None:
    """Build, verify, then tag one image; the untagged image is removed if anything fails."""
    started = time.monotonic()
    report = _Reporter(console, runtime, tag, started)
    old_id = _image_id(client, tag)
    with report:
        pipeline = _run_pipeline(
            mmdebstrap_argv(runtime, mmdebstrap), import_argv(runtime, docker_bin), report.stage
        )
        try:
            report.stage("verifying image")
            checks = _verify(client, pipeline.image_id, runtime)
            repository, version = parse_repository_tag(tag)
            client.images.get(pipeline.image_id).tag(repository, version or "latest")
        except BaseException:
            _remove_image(client, pipeline.image_id)
            raise
    if old_id and old_id != pipeline.image_id:
        _remove_image(client, old_id)  # the replaced image, now dangling; ignored if still in use

    size_mb = client.images.get(tag).attrs.get("Size", 0) / 1e6
    elapsed = time.monotonic() - started
    console.print(
        f"[green]✓[/] {runtime}: built {escape(tag)} in {elapsed:.0f}s, "
        f"{size_mb:.0f} MB ({escape('; '.join(checks))})"
    )


class _Reporter:
    """Spinner with elapsed seconds and the latest mmdebstrap stage on a TTY; plain lines off it."""

    def __init__(self, console: Console, runtime: str, tag: str, started: float) -> None:
        self.console = console
        self.runtime = runtime
        self.tag = tag
        self.started = started
        self.current = "starting"
        self.live = console.is_terminal
        self._status = console.status(self._text()) if self.live else None

    def __enter__(self) -> _Reporter:
        if self._status is not None:
            self._status.start()
        else:
            self.console.print(f"{self.runtime}: building {self.tag}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()

    def _text(self) -> str:
        elapsed = time.monotonic() - self.started
        head = f"{self.runtime} → {self.tag}  {elapsed:4.0f}s  "
        room = max(20, self.console.width - len(head) - 4)  # one line: a wrapped spinner smears
        stage = self.current if len(self.current) <= room else self.current[: room - 1] + "…"
        return (
            f"[bold]{self.runtime}[/] → {escape(self.tag)}  "
            f"[cyan]{elapsed:4.0f}s[/]  {escape(stage)}"
        )

    def stage(self, line: str | None) -> None:
        """Record a new stage line (None = just a clock tick to refresh the elapsed time)."""
        if line is not None:
            self.current = line
            if not self.live:
                elapsed = time.monotonic() - self.started
                self.console.print(
                    f"{self.runtime}: [{elapsed:3.0f}s] {line}", markup=False, soft_wrap=True
                )
        if self._status is not None:
            self._status.update(self._text())


def _stage_of(line: str) -> str | None:
    """``"I: downloading packages..."`` -> ``"downloading packages"``; W:/E: keep their prefix."""
    match = _STAGE_RE.match(line)
    if match is None:
        return None
    level, text = match.groups()
    text = text.strip().rstrip(".").strip()
    return text if level == "I" else f"{level}: {text}"


def _run_pipeline(
    mm_argv: list[str], imp_argv: list[str], on_stage: Callable[[str | None], None]
) -> _Pipeline:
    """Run ``mmdebstrap ... - | docker import -`` in a scratch dir that is always removed."""
    scratch = Path(tempfile.mkdtemp(prefix="nanogrid-mmdebstrap-", dir=SCRATCH_BASE))
    # mkdtemp makes it 0700; apt's _apt user must traverse it to download sandboxed.
    scratch.chmod(0o755)
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    mm: subprocess.Popen[bytes] | None = None
    imp: subprocess.Popen[bytes] | None = None
    try:
        env = {**os.environ, "TMPDIR": str(scratch)}
        imp_out = (scratch / "import.stdout").open("w+b")
        imp_err = (scratch / "import.stderr").open("w+b")
        with imp_out, imp_err:
            mm = subprocess.Popen(
                mm_argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                # Own process group, so an abort can signal mmdebstrap and its chrooted
                # children together (see _stop_mmdebstrap).
                start_new_session=True,
            )
            assert mm.stdout is not None and mm.stderr is not None
            imp = subprocess.Popen(imp_argv, stdin=mm.stdout, stdout=imp_out, stderr=imp_err)
            # docker import owns the read end now, so mmdebstrap gets EPIPE if import dies.
            mm.stdout.close()

            lines: queue.Queue[str | None] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(mm.stderr, lines), daemon=True)
            reader.start()
            done = False
            while not done or mm.poll() is None or imp.poll() is None:
                try:
                    line = lines.get(timeout=0.25)
                except queue.Empty:
                    on_stage(None)
                    continue
                if line is None:
                    done = True
                    if mm.poll() is None:
                        mm.wait()
                    on_stage("importing into docker")
                    continue
                tail.append(line)
                stage = _stage_of(line)
                if stage is not None:
                    on_stage(stage)
            reader.join()

            imp_out.seek(0)
            imp_err.seek(0)
            image_id = imp_out.read().decode(errors="replace").strip()
            import_err = imp_err.read().decode(errors="replace").strip()

        if mm.returncode != 0 or imp.returncode != 0:
            if image_id and imp.returncode == 0:
                _discard_image(imp_argv[0], image_id)
            raise ImageBuildError(
                _failure_message(mm_argv, mm.returncode, list(tail), imp.returncode, import_err)
            )
        if not image_id:
            raise ImageBuildError(f"docker import printed no image ID (stderr: {import_err!r})")
        return _Pipeline(image_id=image_id, stderr_tail=list(tail))
    finally:
        # Import first: a still-running import could otherwise turn the rest of the stream
        # into a complete (untagged) image while mmdebstrap winds down.
        _stop_import(imp)
        _stop_mmdebstrap(mm)
        _remove_scratch(scratch)


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Forward stderr lines to the UI thread; None marks EOF. Splits on CR for progress bars."""
    for raw in stream:
        text = raw.decode(errors="replace")
        for part in text.replace("\r", "\n").splitlines():
            if part.strip():
                lines.put(part.rstrip())
    lines.put(None)


def _failure_message(
    mm_argv: list[str], mm_rc: int | None, tail: list[str], imp_rc: int | None, imp_err: str
) -> str:
    parts = [f"image build failed: mmdebstrap exited {mm_rc}, docker import exited {imp_rc}"]
    parts.append("command: " + " ".join(mm_argv))
    if tail:
        parts.append("last lines of mmdebstrap stderr:\n  " + "\n  ".join(tail))
    if imp_err:
        parts.append("docker import stderr:\n  " + imp_err.replace("\n", "\n  "))
    return "\n".join(parts)


def _stop_import(proc: subprocess.Popen[bytes] | None) -> None:
    """Cancel a running docker import; the daemon then discards the partial image."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop_mmdebstrap(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGINT to the whole group, as Ctrl-C would: mmdebstrap unmounts and cleans its chroot.

    SIGTERM to mmdebstrap alone is not enough: it can finish the current step first.
    SIGKILL only as a last resort (leftover mounts are then handled by _remove_scratch).
    """
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (a killed mmdebstrap can leave /proc, /sys, /dev binds)."""
    prefix = str(path.resolve())
    found: list[str] = []
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _remove_scratch(scratch: Path) -> None:
    """Delete the scratch dir, but never recurse into a leftover bind mount (e.g. the host /dev)."""
    mounts = _mounts_under(scratch)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    if _mounts_under(scratch):
        # Deleting now could remove files on the host through the mount; leave it to a human.
        log.warning("%s still has mounts below it; unmount them, then delete it", scratch)
        return
    shutil.rmtree(scratch, ignore_errors=True)


def _verify(client: docker.DockerClient, image_id: str, runtime: str) -> list[str]:
    """Run the smoke tests offline in the new image; returns each command's first output line."""
    results: list[str] = []
    for command in VERIFY_COMMANDS[runtime]:
        try:
            out = client.containers.run(
                image_id, list(command), remove=True, network_mode="none", stdout=True, stderr=True
            )
        except docker.errors.ContainerError as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
            raise ImageBuildError(
                f"{runtime} image failed its smoke test `{' '.join(command)}` "
                f"(exit {exc.exit_status}): {stderr.strip()}"
            ) from exc
        except docker.errors.APIError as exc:
            raise ImageBuildError(
                f"could not run smoke test in the {runtime} image: {exc}"
            ) from exc
        text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
        first = text.strip().splitlines()[0] if text.strip() else ""
        results.append(f"{command[0]}: {first}")
    return results


def _image_id(client: docker.DockerClient, tag: str) -> str | None:
    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def _remove_image(client: docker.DockerClient, image_id: str) -> None:
    """Best effort: an image still used by a container (or tagged elsewhere) is left alone."""
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(image_id, noprune=False)


def _discard_image(docker_bin: str, image_id: str) -> None:
    """Drop an image imported from a truncated tarball after mmdebstrap failed."""
    subprocess.run([docker_bin, "rmi", image_id], check=False, capture_output=True)
