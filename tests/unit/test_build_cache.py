"""The host-wide C++ build cache: hit, miss, LRU eviction, one compile per key, hostile output."""

from __future__ import annotations

import multiprocessing as mp
import os
import stat
import time
from pathlib import Path

import pytest

from nanogrid_celery.sandbox.build_cache import (
    BuildCache,
    BuildOutputRefused,
    build,
    build_key,
    place_binary,
    read_build_output,
)

BINARY = "/tmp/.nanogrid-main"
MB = 1 << 20


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A stand-in for ``/proc/<pid>/root`` with an empty ``/tmp``."""
    (tmp_path / "root" / "tmp").mkdir(parents=True)
    return tmp_path / "root"


@pytest.fixture
def cache(tmp_path: Path) -> BuildCache:
    return BuildCache(tmp_path / "cache", max_bytes=10 * MB, max_binary_bytes=4 * MB)


def compiler(root: Path, data: bytes = b"\x7fELF binary", calls: list | None = None):
    """A compile step that writes ``data`` where the plan's binary goes."""

    def step():
        if calls is not None:
            calls.append(1)
        (root / "tmp" / ".nanogrid-main").write_bytes(data)
        return None, 123.0

    return step


# -- copy-out: only a regular file of bounded size at our own name ----------------------
def test_reads_a_regular_file(root):
    (root / "tmp" / ".nanogrid-main").write_bytes(b"abc")
    assert read_build_output(root, BINARY, 10) == b"abc"


def test_refuses_a_symlink_where_the_binary_should_be(root, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    (root / "tmp" / ".nanogrid-main").symlink_to(secret)
    with pytest.raises(BuildOutputRefused):
        read_build_output(root, BINARY, MB)


def test_refuses_a_symlinked_directory_on_the_way(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "main").write_bytes(b"host file")
    (root / "tmp" / "build").symlink_to(outside)
    with pytest.raises(BuildOutputRefused):
        read_build_output(root, "/tmp/build/main", MB)


def test_refuses_a_fifo_without_blocking(root):
    os.mkfifo(root / "tmp" / ".nanogrid-main")
    t0 = time.monotonic()
    with pytest.raises(BuildOutputRefused, match="not a regular file"):
        read_build_output(root, BINARY, MB)
    assert time.monotonic() - t0 < 1


def test_refuses_a_huge_file(root):
    with open(root / "tmp" / ".nanogrid-main", "wb") as fh:
        fh.truncate(5 * MB)  # sparse: costs no disk
    with pytest.raises(BuildOutputRefused, match="at most"):
        read_build_output(root, BINARY, 4 * MB)


def test_refuses_a_directory_and_dotdot(root):
    (root / "tmp" / ".nanogrid-main").mkdir()
    with pytest.raises(BuildOutputRefused):
        read_build_output(root, BINARY, MB)
    with pytest.raises(BuildOutputRefused, match="unsafe"):
        read_build_output(root, "/tmp/../etc/passwd", MB)


def test_place_binary_is_root_owned_0755_and_replaces_a_planted_link(root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (root / "tmp" / ".nanogrid-main").symlink_to(victim)
    place_binary(root, BINARY, b"new binary")
    placed = root / "tmp" / ".nanogrid-main"
    st = placed.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert st.st_uid == os.getuid()
    assert placed.read_bytes() == b"new binary"
    assert victim.read_bytes() == b"untouched"


# -- the cache --------------------------------------------------------------------------
def test_key_covers_sources_argv_and_image():
    files = {"main.cpp": b"int main(){}", "util.h": b"#pragma once"}
    argv = ["g++", "-O2", "-o", BINARY, "main.cpp"]
    base = build_key(files, argv, "sha256:aaa")
    assert base == build_key(dict(reversed(files.items())), argv, "sha256:aaa")
    assert base != build_key({**files, "util.h": b"// changed"}, argv, "sha256:aaa")
    assert base != build_key(files, [*argv, "-g"], "sha256:aaa")
    assert base != build_key(files, argv, "sha256:bbb")


def test_miss_then_hit(cache, root):
    calls: list = []
    key = "ab" * 32
    first = build(cache, root, BINARY, key, compiler(root, calls=calls), 5, 4 * MB)
    assert (first.cached, first.compile_ms, first.failure) == (False, 123.0, None)
    (root / "tmp" / ".nanogrid-main").unlink()  # the reset wipes /tmp
    second = build(cache, root, BINARY, key, compiler(root, calls=calls), 5, 4 * MB)
    assert second.cached and second.compile_ms is None
    assert calls == [1]
    assert (root / "tmp" / ".nanogrid-main").read_bytes() == b"\x7fELF binary"


def test_compile_failure_is_not_stored(cache, root):
    key = "cd" * 32
    failed = build(cache, root, BINARY, key, lambda: ("compile_error", 50.0), 5, 4 * MB)
    assert failed.failure == "compile_error" and not failed.cached
    assert cache.get(key) is None


def test_hostile_build_output_is_not_stored(cache, root, tmp_path):
    key = "ef" * 32
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")

    def link_instead_of_binary():
        (root / "tmp" / ".nanogrid-main").symlink_to(secret)
        return None, 10.0

    result = build(cache, root, BINARY, key, link_instead_of_binary, 5, 4 * MB)
    assert not result.cached and result.binary is None
    assert cache.get(key) is None
    assert not any(p.name.endswith(".bin") for p in cache.root.iterdir())


def test_oversized_binary_is_run_but_not_stored(tmp_path, root):
    small = BuildCache(tmp_path / "small", max_bytes=10 * MB, max_binary_bytes=1024)
    key = "12" * 32
    result = build(small, root, BINARY, key, compiler(root, b"x" * 2048), 5, 1024)
    assert result.failure is None and not result.cached
    assert small.get(key) is None


def test_lru_eviction_by_bytes(tmp_path):
    cache = BuildCache(tmp_path / "lru", max_bytes=3000, max_binary_bytes=2000)
    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    cache.put(a, b"1" * 1000)
    cache.put(b, b"2" * 1000)
    old = time.time() - 100
    os.utime(cache.root / f"{a}.bin", (old, old))
    os.utime(cache.root / f"{b}.bin", (old + 1, old + 1))
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, b"3" * 1500)  # 3500 > 3000: the least recently used (b) goes
    assert cache.get(b) is None
    assert cache.get(a) is not None and cache.get(c) is not None
    assert sum(size for _, size, _ in cache.entries()) <= 3000


def _build_in_process(cache_dir: str, root: str, counter: str, key: str, out: str) -> None:
    cache = BuildCache(Path(cache_dir), 10 * MB, 4 * MB)
    root_path = Path(root)

    def slow_compile():
        with open(counter, "a") as fh:
            fh.write("x")
        time.sleep(0.5)
        (root_path / "tmp" / ".nanogrid-main").write_bytes(b"built once")
        return None, 500.0

    result = build(cache, root_path, BINARY, key, slow_compile, 10, 4 * MB)
    Path(out).write_text(str(result.cached))


def test_two_processes_building_the_same_key_compile_once(tmp_path):
    key = "77" * 32
    counter = tmp_path / "compiles"
    procs = []
    for i in range(2):
        root = tmp_path / f"root{i}"
        (root / "tmp").mkdir(parents=True)
        args = (str(tmp_path / "shared"), str(root), str(counter), key, str(tmp_path / f"out{i}"))
        procs.append(mp.get_context("fork").Process(target=_build_in_process, args=args))
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    assert counter.read_text() == "x"
    assert sorted((tmp_path / f"out{i}").read_text() for i in range(2)) == ["False", "True"]
    for i in range(2):
        assert (tmp_path / f"root{i}" / "tmp" / ".nanogrid-main").read_bytes() == b"built once"
