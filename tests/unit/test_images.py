"""Unit tests for the offline image builder, with no Docker daemon and no mmdebstrap.

The real subprocess pipeline runs against tiny shell stand-ins for ``mmdebstrap`` and
``docker`` placed first on PATH, and the Docker SDK client is a fake, so the argv, the
plumbing, the scratch-dir cleanup and the error paths are all exercised for real.
"""

from __future__ import annotations

import io
import stat
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from rich.console import Console

from nanogrid_celery.config import Settings
from nanogrid_celery.sandbox import images

FAKE_MMDEBSTRAP = """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_DIR/mm.argv"
printf '%s\\n' "$TMPDIR" > "$FAKE_DIR/mm.tmpdir"
if [ "${FAKE_MM_MODE:-ok}" = fail ]; then
    i=1
    while [ $i -le 50 ]; do echo "noise line $i" >&2; i=$((i + 1)); done
    echo "E: apt-get download failed: boom" >&2
    exit 1
fi
echo "I: running apt-get update..." >&2
echo "I: downloading packages with apt..." >&2
echo "I: creating tarball..." >&2
printf 'TARBALL'
"""

FAKE_DOCKER = """#!/bin/sh
if [ "$1" = import ]; then
    printf '%s\\n' "$@" > "$FAKE_DIR/docker.argv"
    cat > "$FAKE_DIR/docker.stdin"
    echo sha256:feedface
else
    printf '%s\\n' "$@" >> "$FAKE_DIR/docker.other"
fi
"""

NEW_ID = "sha256:feedface"


class FakeImage:
    def __init__(self, client: FakeClient, image_id: str) -> None:
        self.client = client
        self.id = image_id
        self.attrs = {"Size": 142_000_000}

    def tag(self, repository: str, tag: str | None = None) -> bool:
        self.client.tags[f"{repository}:{tag}"] = self.id
        return True


class FakeImages:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.removed: list[str] = []

    def get(self, ref: str) -> FakeImage:
        image_id = self.client.tags.get(ref, ref if ref == NEW_ID else None)
        if image_id is None:
            raise docker.errors.ImageNotFound(f"no such image: {ref}")
        return FakeImage(self.client, image_id)

    def remove(self, image: str, noprune: bool = False) -> None:
        self.removed.append(image)
        self.client.tags = {t: i for t, i in self.client.tags.items() if i != image}


class FakeContainers:
    def __init__(self) -> None:
        self.runs: list[tuple[str, list[str], dict[str, Any]]] = []
        self.fail_with: int | None = None

    def run(self, image: str, command: list[str], **kwargs: Any) -> bytes:
        self.runs.append((image, command, kwargs))
        if self.fail_with is not None:
            raise docker.errors.ContainerError(
                None, self.fail_with, command, image, b"python3: not found"
            )
        return b"g++ (Debian 12.2.0-14) 12.2.0\n" if command[0] == "g++" else b"1\n"


class FakeClient:
    def __init__(self, tags: dict[str, str] | None = None) -> None:
        self.tags: dict[str, str] = dict(tags or {})
        self.images = FakeImages(self)
        self.containers = FakeContainers()


@pytest.fixture
def settings() -> Settings:
    return Settings(python_image="test-python:latest", cpp_image="test-cpp:latest")


@pytest.fixture
def console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put fake mmdebstrap/docker first on PATH and keep the scratch dir inside tmp_path."""
    bin_dir = tmp_path / "bin"
    out_dir = tmp_path / "out"
    scratch_base = tmp_path / "scratch"
    for d in (bin_dir, out_dir, scratch_base):
        d.mkdir()
    for name, body in (("mmdebstrap", FAKE_MMDEBSTRAP), ("docker", FAKE_DOCKER)):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_DIR", str(out_dir))
    monkeypatch.setattr(images, "SCRATCH_BASE", str(scratch_base))
    return out_dir


def use_client(monkeypatch: pytest.MonkeyPatch, client: FakeClient) -> FakeClient:
    monkeypatch.setattr(images, "_docker_client", lambda: client)
    return client


def test_mmdebstrap_argv_python() -> None:
    assert images.mmdebstrap_argv("python") == [
        "mmdebstrap",
        "--variant=essential",
        "--include=python3",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "bookworm",
        "-",
    ]


def test_mmdebstrap_argv_cpp_includes_python_for_the_agent() -> None:
    argv = images.mmdebstrap_argv("cpp")
    assert "--include=python3,g++" in argv
    assert argv[-2:] == ["bookworm", "-"]


def test_import_argv_labels_runtime() -> None:
    assert images.import_argv("cpp") == [
        "docker",
        "import",
        "--change",
        "LABEL nanogrid.image=cpp",
        "-",
    ]


def test_unknown_runtime_is_rejected(settings: Settings, console: Console) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'rust'"):
        images.build_images(settings, runtimes=["rust"], console=console)


@pytest.mark.parametrize(
    ("line", "stage"),
    [
        ("I: downloading packages with apt...", "downloading packages with apt"),
        ("W: something odd", "W: something odd"),
        ("E: it broke", "E: it broke"),
        ("Get:1 http://deb.debian.org bookworm InRelease", None),
    ],
)
def test_stage_of(line: str, stage: str | None) -> None:
    assert images._stage_of(line) == stage


def test_image_exists() -> None:
    client = FakeClient({"test-python:latest": "sha256:old"})
    assert images.image_exists(client, "test-python:latest")  # type: ignore[arg-type]
    assert not images.image_exists(client, "test-cpp:latest")  # type: ignore[arg-type]


def test_existing_images_are_skipped_without_needing_mmdebstrap(
    settings: Settings, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_client(monkeypatch, FakeClient({"test-python:latest": "a", "test-cpp:latest": "b"}))
    monkeypatch.setattr(images.shutil, "which", lambda name: None)
    assert images.build_images(settings, console=console) == {"python": "exists", "cpp": "exists"}


def test_missing_mmdebstrap_says_how_to_install(
    settings: Settings, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_client(monkeypatch, FakeClient())
    monkeypatch.setattr(images.shutil, "which", lambda name: None)
    with pytest.raises(images.ImageBuildError, match="apt-get install -y mmdebstrap"):
        images.build_images(settings, runtimes=["python"], console=console)


def test_unreachable_docker_is_a_clear_error(
    settings: Settings, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> None:
        raise docker.errors.DockerException("Error while fetching server API version")

    monkeypatch.setattr(images.docker, "from_env", boom)
    with pytest.raises(images.ImageBuildError, match="cannot reach the Docker daemon"):
        images.build_images(settings, console=console)


def test_build_python_runs_pipeline_verifies_and_tags(
    settings: Settings,
    console: Console,
    fake_tools: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = use_client(monkeypatch, FakeClient({"test-cpp:latest": "sha256:cpp"}))

    result = images.build_images(settings, console=console)

    assert result == {"python": "built", "cpp": "exists"}
    mm_argv = (fake_tools / "mm.argv").read_text().splitlines()
    assert mm_argv == images.mmdebstrap_argv("python")[1:]
    assert (fake_tools / "docker.argv").read_text().splitlines() == [
        "import",
        "--change",
        "LABEL nanogrid.image=python",
        "-",
    ]
    assert (fake_tools / "docker.stdin").read_text() == "TARBALL"
    # mmdebstrap worked in a private scratch dir under SCRATCH_BASE, removed afterwards.
    tmpdir = Path((fake_tools / "mm.tmpdir").read_text().strip())
    assert tmpdir.parent == tmp_path / "scratch"
    assert not tmpdir.exists()
    assert list((tmp_path / "scratch").iterdir()) == []
    # Verified offline, then tagged.
    (image, command, kwargs) = client.containers.runs[0]
    assert (image, command) == (NEW_ID, ["python3", "-c", "print(1)"])
    assert kwargs["network_mode"] == "none" and kwargs["remove"] is True
    assert client.tags["test-python:latest"] == NEW_ID
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "downloading packages with apt" in out
    assert "built test-python:latest" in out and "142 MB" in out


def test_force_rebuilds_cpp_checks_gxx_and_drops_old_image(
    settings: Settings, console: Console, fake_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = use_client(monkeypatch, FakeClient({"test-cpp:latest": "sha256:old"}))

    result = images.build_images(settings, force=True, runtimes=["cpp"], console=console)

    assert result == {"cpp": "built"}
    assert "--include=python3,g++" in (fake_tools / "mm.argv").read_text().splitlines()
    assert [cmd for _, cmd, _ in client.containers.runs] == [
        ["python3", "-c", "print(1)"],
        ["g++", "--version"],
    ]
    assert client.tags["test-cpp:latest"] == NEW_ID
    assert client.images.removed == ["sha256:old"]


def test_mmdebstrap_failure_raises_with_stderr_tail(
    settings: Settings,
    console: Console,
    fake_tools: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = use_client(monkeypatch, FakeClient())
    monkeypatch.setenv("FAKE_MM_MODE", "fail")

    with pytest.raises(images.ImageBuildError) as excinfo:
        images.build_images(settings, runtimes=["python"], console=console)

    message = str(excinfo.value)
    assert "mmdebstrap exited 1" in message
    assert "E: apt-get download failed: boom" in message
    assert "noise line 50" in message
    assert "noise line 1\n" not in message  # only the tail, not the whole log
    assert "test-python:latest" not in client.tags
    assert client.containers.runs == []
    assert list((tmp_path / "scratch").iterdir()) == []


def test_failed_smoke_test_removes_image_and_keeps_tag_free(
    settings: Settings, console: Console, fake_tools: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = use_client(monkeypatch, FakeClient())
    client.containers.fail_with = 127

    with pytest.raises(images.ImageBuildError, match="smoke test"):
        images.build_images(settings, runtimes=["python"], console=console)

    assert "test-python:latest" not in client.tags
    assert client.images.removed == [NEW_ID]
