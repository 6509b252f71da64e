"""Python environments for ``requirements.txt``: built once per host, mounted read-only.

Where they live: ``<NANOGRID_DEPS_DIR or NANOGRID_WORK_ROOT/envs>/<key>/site``, one
directory per environment, shared by every worker process and container of the
host. The key is a sha256 of the normalised requirements
(execution/requirements.py), the runtime image's id and its Python version and
platform, so a rebuilt image gets new environments and equal requirement sets
share one.

How a run sees one: every python container gets the whole env root mounted
read-only at ``/nanogrid/envs`` when it is created (warm containers exist before
the request), and the run selects its environment with
``PYTHONPATH=/nanogrid/envs/<key>/site``; the zygote puts ``PYTHONPATH`` on
``sys.path`` in the forked child exactly where ``python3 main.py`` would. The
tenant cannot write into it (read-only bind) and has no network (``network_mode
none``) - only the build step downloads.

How one is built (``PipBuilder``), safely: ``pip download --only-binary=:all:``
for the image's Python and platform (wheels only, so no package's setup code
runs anywhere), from the host pip's configured index, or only from the
``NANOGRID_PIP_*`` overrides when set (the host configuration is then ignored);
then ``pip install --no-index --find-links <downloads> --target`` (no network).
Both steps share one deadline and the result one size limit. The build goes to
``.tmp/<key>-<random>`` and is renamed into place: an environment directory
that exists is complete; a failed build leaves nothing behind, so it is tried
again next time (and reported as ``dependency_error`` with pip's reason).

Concurrency, across threads and processes, by ``flock`` on two files per key in
``.locks/``: ``<key>.build`` (exclusive while building: concurrent first uses
wait for the one build) and ``<key>.use`` (shared while a run uses the
environment; eviction takes it exclusively and non-blocking, so an
environment in use is never evicted). Lock files are never deleted (removing a
lock file that someone waits on is the classic flock race).

Eviction: after each build, while all environments together exceed
``NANOGRID_DEPS_CACHE_MB``, the least recently used one not in use goes (last
use is the mtime of its ``meta.json``, touched on every acquire: one syscall).

Measured (benchmarks/deps.py, 2 cores, a VM running alongside): a new
two-wheel set builds in ~0.9 s p50 from a local index (six + attrs from the
host's index: 3.6 s); finding a built one takes 0.1 ms; warm runs with an
environment vs without: client p50 33.0 vs 32.2 ms (1.02x), worker 7.8 vs 6.1 ms.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings
from nanogrid_celery.errors import DependencyError, InternalError

log = get_logger(__name__)

ENVS_MOUNT = "/nanogrid/envs"  # the env root inside every python container (read-only)
SITE = "site"
META = "meta.json"
PIP_OUTPUT_CAP = 4000  # characters of pip's reason kept in a result message
TMP_MAX_AGE_S = 3600  # a build directory older than this belongs to a dead builder


@dataclass(frozen=True)
class Target:
    """What the environment is built for: the runtime image and its interpreter."""

    image_id: str
    python_version: str  # "3.11"
    platform: str = "manylinux_2_36_x86_64"  # bookworm: glibc 2.36; pip accepts older tags too

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")


class Builder(Protocol):
    def build(self, requirements: list[str], target: Target, dest: Path, deadline: float) -> None:
        """Fill ``dest/site`` with the requirements; raise DependencyError if they cannot be."""
        ...


@dataclass
class EnvHandle:
    """One run's use of an environment: holds the shared use-lock until released."""

    key: str
    host_path: Path
    built: bool  # this acquire built it (first use)
    ms: float
    _fd: int | None = None

    @property
    def pythonpath(self) -> str:
        return f"{ENVS_MOUNT}/{self.key}/{SITE}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def env_key(requirements: list[str], target: Target) -> str:
    blob = json.dumps(
        {
            "requirements": requirements,
            "image": target.image_id,
            "python": target.python_version,
            "platform": target.platform,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def env_root(settings: Settings) -> Path:
    return Path(settings.deps_dir or Path(settings.work_root) / "envs")


def env_mount(settings: Settings, runtime: str) -> dict[str, dict[str, str]]:
    """The read-only volume every python container gets at creation (``create_kwargs``)."""
    if runtime != "python" or not settings.deps_enabled:
        return {}
    root = env_root(settings)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)  # as EnvStore leaves it: reach a known key, list none
    return {str(root): {"bind": ENVS_MOUNT, "mode": "ro"}}


class EnvStore:
    """The host's environments: acquire (building on first use), release, evict."""

    def __init__(self, settings: Settings, builder: Builder | None = None) -> None:
        self.settings = settings
        self.root = env_root(settings)
        self.builder = builder or PipBuilder(settings)
        self.cache_bytes = settings.deps_cache_mb * 1024 * 1024
        for sub in (".locks", ".tmp", ".trash"):  # host-only: mounted, but unreadable inside
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        # the sandbox user may pass through to its own env's site dir, not list the others
        self.root.chmod(0o711)
        self._sweep_stale()

    # -- one run ---------------------------------------------------------------------
    def acquire(self, requirements: list[str], target: Target) -> EnvHandle:
        """The environment for these requirements, built if needed; held until release()."""
        t0 = time.perf_counter()
        key = env_key(requirements, target)
        path = self.root / key
        use = self._lock_fd(key, "use")
        built = False
        try:
            fcntl.flock(use, fcntl.LOCK_SH)  # blocks only while an eviction of this key runs
            if not path.is_dir():
                built = self._build_once(key, requirements, target)
            with contextlib.suppress(OSError):
                os.utime(path / META)  # last use, for LRU
        except BaseException:
            os.close(use)
            raise
        ms = round((time.perf_counter() - t0) * 1000, 3)
        if built:
            self.evict()
        return EnvHandle(key, path, built, ms, use)

    def _build_once(self, key: str, requirements: list[str], target: Target) -> bool:
        """Build under the key's build lock; False if another process built it meanwhile."""
        lock = self._lock_fd(key, "build")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (self.root / key).is_dir():
                return False
            tmp = self.root / ".tmp" / f"{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(mode=0o755)
            t0 = time.perf_counter()
            try:
                deadline = time.monotonic() + self.settings.deps_build_timeout_s
                self.builder.build(requirements, target, tmp, deadline)
                _make_world_readable(tmp)
                size = _tree_bytes(tmp)
                limit = self.settings.deps_max_env_mb * 1024 * 1024
                if size > limit:
                    raise DependencyError(
                        f"the environment for {', '.join(requirements)} is {size >> 20} MB, "
                        f"over the {self.settings.deps_max_env_mb} MB limit"
                    )
                meta = {
                    "requirements": requirements,
                    "image_id": target.image_id,
                    "python": target.python_version,
                    "bytes": size,
                    "build_ms": round((time.perf_counter() - t0) * 1000, 1),
                    "built_at": time.time(),
                    "packages": _installed(tmp / SITE),
                }
                (tmp / META).write_text(json.dumps(meta, indent=1))
                (tmp / META).chmod(0o644)
                os.rename(tmp, self.root / key)  # atomic: an env directory is always complete
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed build is never cached
                raise
            log.info(
                "environment built",
                env=key,
                requirements=requirements,
                bytes=size,
                build_ms=meta["build_ms"],
            )
            return True
        finally:
            os.close(lock)

    # -- eviction --------------------------------------------------------------------
    def evict(self) -> list[str]:
        """Remove least recently used environments not in use until the total fits."""
        envs = []
        for meta_path in self.root.glob(f"*/{META}"):
            try:
                size = int(json.loads(meta_path.read_text()).get("bytes", 0))
                envs.append((meta_path.stat().st_mtime, meta_path.parent.name, size))
            except (OSError, ValueError):
                continue
        total = sum(size for _, _, size in envs)
        evicted: list[str] = []
        for _, key, size in sorted(envs):
            if total <= self.cache_bytes:
                break
            if self._evict_one(key):
                total -= size
                evicted.append(key)
        if evicted:
            log.info("environments evicted", envs=evicted, total_bytes=total)
        return evicted

    def _evict_one(self, key: str) -> bool:
        use = self._lock_fd(key, "use")
        try:
            try:
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a run holds it
            trash = self.root / ".trash" / f"{key}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.root / key, trash)
            except FileNotFoundError:
                return False
        finally:
            os.close(use)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def total_bytes(self) -> int:
        total = 0
        for meta_path in self.root.glob(f"*/{META}"):
            with contextlib.suppress(OSError, ValueError):
                total += int(json.loads(meta_path.read_text()).get("bytes", 0))
        return total

    # -- helpers ---------------------------------------------------------------------
    def _lock_fd(self, key: str, kind: str) -> int:
        return os.open(self.root / ".locks" / f"{key}.{kind}", os.O_RDWR | os.O_CREAT, 0o600)

    def _sweep_stale(self) -> None:
        """Leftovers of builders and evictions that died half-way."""
        now = time.time()
        for sub in (".tmp", ".trash"):
            for entry in (self.root / sub).iterdir():
                with contextlib.suppress(OSError):
                    if sub == ".trash" or now - entry.stat().st_mtime > TMP_MAX_AGE_S:
                        shutil.rmtree(entry, ignore_errors=True)


class PipBuilder:
    """``pip download`` (wheels only, with network) then ``pip install --no-index --target``."""

    def __init__(self, settings: Settings, python: str = sys.executable) -> None:
        self.settings = settings
        self.python = python

    def build(self, requirements: list[str], target: Target, dest: Path, deadline: float) -> None:
        wheels, site = dest / "wheels", dest / SITE
        wheels.mkdir()
        reqfile = dest / "requirements.txt"
        reqfile.write_text("\n".join(requirements) + "\n")
        tags = [
            "--only-binary=:all:",
            "--python-version",
            target.python_version,
            "--implementation",
            "cp",
            "--abi",
            target.abi,
            "--platform",
            target.platform,
        ]
        common = ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
        download = [self.python, "-m", "pip", "download", *common, *tags, "--dest", str(wheels)]
        self._pip([*download, *self._sources(), "-r", str(reqfile)], requirements, deadline, True)
        limit_mb = self.settings.deps_max_env_mb
        if _tree_bytes(wheels) > limit_mb * 1024 * 1024:  # before unpacking it, too
            raise DependencyError(
                f"the wheels for {', '.join(requirements)} are over the {limit_mb} MB limit"
            )
        install = [self.python, "-m", "pip", "install", *common, *tags, "--no-index"]
        install += ["--find-links", str(wheels), "--target", str(site), "--no-warn-script-location"]
        self._pip([*install, "-r", str(reqfile)], requirements, deadline, False)
        shutil.rmtree(wheels, ignore_errors=True)
        reqfile.unlink()

    def _sources(self) -> list[str]:
        s = self.settings
        args: list[str] = []
        if s.pip_index_url:
            args += ["--index-url", s.pip_index_url]
        for url in s.pip_extra_index_url.split():
            args += ["--extra-index-url", url]
        if s.pip_find_links:
            args += ["--find-links", s.pip_find_links]
            if not s.pip_index_url and not s.pip_extra_index_url:
                args.append("--no-index")  # a wheel folder alone is the only source
        return args

    def _env(self, network: bool) -> dict[str, str]:
        """The host's pip configuration, unless overrides are set (or for the offline step)."""
        env = dict(os.environ)
        s = self.settings
        if not network or s.pip_index_url or s.pip_extra_index_url or s.pip_find_links:
            env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
            env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
        return env

    def _pip(
        self, argv: list[str], requirements: list[str], deadline: float, network: bool
    ) -> None:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise DependencyError(f"building {', '.join(requirements)} ran out of time")
        try:
            proc = subprocess.run(
                argv,
                env=self._env(network),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            limit = self.settings.deps_build_timeout_s
            raise DependencyError(
                f"building {', '.join(requirements)} took longer than {limit} s"
            ) from None
        except OSError as exc:
            raise InternalError(f"could not run pip: {exc}") from exc
        if proc.returncode != 0:
            raise DependencyError(_pip_reason(proc.stderr, proc.stdout))


def _pip_reason(stderr: str, stdout: str) -> str:
    """pip's own ``ERROR:`` lines (they name the requirement), else the tail of its output."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.startswith("ERROR:")]
    reason = "\n".join(lines) or (stderr.strip() or stdout.strip())[-PIP_OUTPUT_CAP:]
    return f"could not install requirements.txt: {reason}"[:PIP_OUTPUT_CAP]


def _make_world_readable(root: Path) -> None:
    """The sandbox user (65534) reads the tree; nobody but the host can write (ro mount)."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o111 else 0o644)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _installed(site: Path) -> dict[str, str]:
    """name -> version from the ``*.dist-info`` directories pip wrote."""
    found = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        found[name] = version
    return found


# -- the image's interpreter -----------------------------------------------------------------
PROBE = "import sys, platform; print(sys.version_info[0], sys.version_info[1], platform.libc_ver()[1], platform.machine())"  # noqa: E501


class TargetProbe:
    """The runtime image's id (looked up at most every ``ttl`` s) and its Python, probed once
    per image id per host (~1 s of ``docker run``) and remembered in ``<env root>/.images``."""

    def __init__(
        self, settings: Settings, client_factory: Callable[[], object], ttl: float = 30.0
    ) -> None:
        self.settings = settings
        self.client_factory = client_factory
        self.ttl = ttl
        self._cached: tuple[float, Target] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Target:
        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < self.ttl:
                return self._cached[1]
            target = self._probe()
            self._cached = (time.monotonic(), target)
            return target

    def _probe(self) -> Target:
        import docker.errors

        client = self.client_factory()
        image = self.settings.python_image
        try:
            image_id = client.images.get(image).id  # type: ignore[attr-defined]
            cache = env_root(self.settings) / ".images" / f"{image_id.replace(':', '-')}.json"
            if cache.exists():
                return Target(**json.loads(cache.read_text()))
            out = client.containers.run(  # type: ignore[attr-defined]
                image,
                ["python3", "-c", PROBE],
                remove=True,
                network_mode="none",
                labels={"nanogrid.probe": "1"},
            )
        except (docker.errors.DockerException, OSError) as exc:
            raise InternalError(f"could not inspect the python image {image}: {exc}") from exc
        major, minor, glibc, machine = out.decode().split()
        platform = f"manylinux_{glibc.replace('.', '_')}_{machine}"
        target = Target(image_id, f"{major}.{minor}", platform)
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(target.__dict__))
        os.rename(tmp, cache)
        return target
