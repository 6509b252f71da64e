"""Tiny pure-python wheels and a local PEP 503 index on 127.0.0.1, so no test needs a public one.

A wheel is only a zip: the package, ``<name>-<version>.dist-info/`` with METADATA,
WHEEL and RECORD (sha256 of each file). :class:`LocalIndex` serves
``/simple/<name>/`` pages linking to ``/files/<wheel>#sha256=...`` from a thread.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.server
import threading
import zipfile
from functools import partial
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def make_wheel(
    dest: Path,
    name: str,
    version: str,
    *,
    requires: tuple[str, ...] = (),
    code: str | None = None,
    padding: int = 0,
) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` to ``dest``; the module prints nothing on
    import and has ``__version__``. ``padding`` bytes of incompressible data make it bigger."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files: dict[str, bytes] = {
        f"{module}/__init__.py": (code or f"__version__ = {version!r}\n").encode(),
        f"{info}/METADATA": (
            "Metadata-Version: 2.1\n"
            f"Name: {name}\n"
            f"Version: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        ).encode(),
        f"{info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: nanogrid-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    if padding:
        files[f"{module}/blob.bin"] = hashlib.shake_256(name.encode()).digest(padding)
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{info}/RECORD,,\n"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name_in_zip, data in files.items():
            zf.writestr(name_in_zip, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


class LocalIndex:
    """A PEP 503 simple index over the wheels in ``root/files``, on a free 127.0.0.1 port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        handler = partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    def add(self, name: str, version: str, **kw) -> Path:
        wheel = make_wheel(self.files, name, version, **kw)
        self._write_pages()
        return wheel

    def _write_pages(self) -> None:
        projects: dict[str, list[Path]] = {}
        for wheel in sorted(self.files.glob("*.whl")):
            project = wheel.name.split("-")[0].replace("_", "-").lower()
            projects.setdefault(project, []).append(wheel)
        simple = self.root / "simple"
        for project, wheels in projects.items():
            links = "".join(
                f'<a href="/files/{html.escape(w.name)}#sha256='
                f'{hashlib.sha256(w.read_bytes()).hexdigest()}">{html.escape(w.name)}</a><br>\n'
                for w in wheels
            )
            page = simple / project
            page.mkdir(parents=True, exist_ok=True)
            (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>")
        (simple / "index.html").write_text(
            "<html><body>"
            + "".join(f'<a href="{p}/">{p}</a><br>' for p in sorted(projects))
            + "</body></html>"
        )

    def start(self) -> LocalIndex:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass
