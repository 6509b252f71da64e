"""The reset's wipe handles any tree a run can make: depth, count, names, permissions, links."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nanogrid_celery.sandbox.scratch import rlimits, scratch_sizes
from nanogrid_celery.sandbox.wipe import empty_dir

MiB = 1 << 20


def _chain(top: Path, depth: int, name: str = "d") -> None:
    fd = os.open(top, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open("leaf\n", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    os.close(fd)


def test_a_tree_deeper_than_the_recursion_limit_and_path_max_is_wiped(tmp_path):
    _chain(tmp_path, sys.getrecursionlimit() * 3, "n" * 200)  # paths far beyond PATH_MAX
    empty_dir(tmp_path)
    assert os.listdir(tmp_path) == []


def test_odd_names_permissions_and_links_are_wiped_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    top = tmp_path / "top"
    (top / "a\nb" / "c").mkdir(parents=True)
    (top / "a\nb" / "c" / "f").write_text("x")
    (top / "link").symlink_to(outside)
    (top / "a\nb" / "dirlink").symlink_to(outside, target_is_directory=True)
    (top / ".hidden").write_text("x")
    (top / "a\nb" / "c").chmod(0)
    (top / "a\nb").chmod(0o500)
    for i in range(2000):
        (top / f"f{i}").touch()
    empty_dir(top)
    assert os.listdir(top) == [] and (outside / "keep").read_text() == "x"


def test_scratch_follows_the_memory_limit_and_totals_half_of_it():
    for mb in (32, 256, 2048):
        sizes = scratch_sizes(mb * MiB)
        assert sizes["tmp"] == sizes["dev/shm"] == mb * MiB // 8
        assert sizes["sandbox"] == mb * MiB // 4 + 4 * MiB
    assert scratch_sizes(256 * MiB, 5 * MiB)["sandbox"] == 64 * MiB + 8 * MiB
    assert rlimits(256 * MiB) == {"nofile": 1024, "fsize": 68 * MiB, "stack": 64 * MiB}
