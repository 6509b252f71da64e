"""A submission's ``requirements.txt``: accepted lines, refused options, one normal form.

Only requirement specifiers are accepted (``six``, ``attrs==23.2.0``,
``pkg[extra]>=1,<2; python_version >= "3.8"``), pinned or not; comments and
blank lines are fine. Everything pip would treat as an instruction rather than
a name - options (``-e``, ``-r``, ``--index-url``, ``--find-links``, ...), URLs,
``git+`` VCS references, local paths and ``name @ url`` - is refused: it would
pick the source of the code (or read a host file) on the tenant's behalf.

The normal form (canonical names, sorted extras and specifiers, sorted and
de-duplicated lines) is what an environment's key is computed from, so
``Six == 1.16.0`` and ``six==1.16.0`` share one environment.
"""

from __future__ import annotations

import re

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from nanogrid_celery.errors import RunRejected

REQUIREMENTS_FILE = "requirements.txt"
MAX_BYTES = 64 * 1024
_COMMENT = re.compile(r"(^|\s+)#.*$")
_NOT_A_NAME = ("://", "git+", "hg+", "svn+", "bzr+", "file:")


def parse_requirements(data: bytes, max_lines: int = 100) -> list[str]:
    """The normalised requirement lines; a refused or invalid line raises RunRejected."""
    if len(data) > MAX_BYTES:
        raise RunRejected(f"{REQUIREMENTS_FILE} is larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RunRejected(f"{REQUIREMENTS_FILE} is not UTF-8: {exc}") from None
    lines: set[str] = set()
    for number, line in _logical_lines(text):
        lines.add(_normalise(number, line))
        if len(lines) > max_lines:
            raise RunRejected(f"{REQUIREMENTS_FILE} has more than {max_lines} requirements")
    return sorted(lines)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) per requirement: comments stripped, ``\\`` continuations joined."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        line = _COMMENT.sub("", raw).strip() if not raw.rstrip().endswith("\\") else raw.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line:
            out.append((start, line))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def _normalise(number: int, line: str) -> str:
    where = f"{REQUIREMENTS_FILE} line {number}"
    if line.startswith("-"):
        option = line.split()[0].split("=")[0]
        raise RunRejected(f"{where}: pip options are not allowed ({option}); list package names")
    lower = line.lower()
    if any(marker in lower for marker in _NOT_A_NAME) or line.startswith((".", "/", "~", "\\")):
        raise RunRejected(f"{where}: URLs, VCS references and paths are not allowed: {line!r}")
    try:
        req = Requirement(line)
    except InvalidRequirement as exc:
        raise RunRejected(f"{where}: not a requirement {line!r}: {exc}") from None
    if req.url:
        raise RunRejected(f"{where}: direct references (name @ url) are not allowed: {line!r}")
    text = canonicalize_name(req.name)
    if req.extras:
        text += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    text += str(req.specifier)  # SpecifierSet renders its specifiers sorted
    if req.marker is not None:
        text += f"; {req.marker}"
    return text
