"""Submissions that are valid name by name but cannot be staged (issue 11, class 6).

Shared by the unit tests (parsing, moto in-process) and the integration test (a real
worker must reject every one of them without touching a container). Each builder
returns raw zip bytes; ``PREFIX_CASES`` are S3 key sets for the prefix layout.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib


def zipped(entries, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def _rename(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace a name in both the local and the central header (same length)."""
    assert len(old) == len(new) and data.count(old) == 2
    return data.replace(old, new)


def nul_in_name() -> bytes:
    """``main.py\\0evil``: Python's zipfile truncates at the NUL and would stage main.py."""
    return _rename(zipped([("main.pyXevil", b"print('ran')")]), b"main.pyXevil", b"main.py\0evil")


def file_and_dir_same_name() -> bytes:
    return zipped([("main.py", b"print(1)"), ("a", b"x"), ("a/b", b"y")])


def dir_entry_and_file_same_name() -> bytes:
    return zipped([("main.py", b"print(1)"), ("a/", b""), ("a", b"x")])


def duplicate_names() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("main.py", b"print(1)")
        zf.writestr("main.py", b"print(2)")  # zipfile warns, writes both
    return buf.getvalue()


def duplicate_after_normalising() -> bytes:
    return zipped([("main.py", b"print(1)"), ("./main.py", b"print(2)")])


def long_component() -> bytes:
    return zipped([("main.py", b"print(1)"), ("x" * 256 + ".py", b"y")])


def long_component_multibyte() -> bytes:
    """128 characters but 256 bytes in UTF-8: the limit is in bytes."""
    return zipped([("main.py", b"print(1)"), ("\u00e9" * 128, b"y")])


def long_path() -> bytes:
    """Every component short, the whole path over PATH_MAX (4096)."""
    return zipped([("main.py", b"print(1)"), ("/".join(["d" * 200] * 21) + "/f", b"y")])


def deep_path() -> bytes:
    """2,000 levels: pathlib's mkdir(parents=True) recurses once per level."""
    return zipped([("main.py", b"print(1)"), ("a/" * 2000 + "f", b"y")])


def corrupt_deflate() -> bytes:
    """A deflate stream with an invalid block type: zlib.error when read."""
    good = zipped([("main.py", b"print(1)\n" * 200)])
    info = zipfile.ZipFile(io.BytesIO(good)).infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode())
    data = bytearray(good)
    data[start : start + info.compress_size] = b"\xff" * info.compress_size
    return bytes(data)


def bad_crc() -> bytes:
    good = zipped([("main.py", b"print('stored')")], method=zipfile.ZIP_STORED)
    info = zipfile.ZipFile(io.BytesIO(good)).infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode())
    data = bytearray(good)
    data[start] ^= 0x01
    return bytes(data)


def unsupported_method() -> bytes:
    """Compression method 99 (AES): zipfile raises NotImplementedError."""
    good = zipped([("main.py", b"print(1)")], method=zipfile.ZIP_STORED)
    data = bytearray(good)
    info = zipfile.ZipFile(io.BytesIO(good)).infolist()[0]
    struct.pack_into("<H", data, info.header_offset + 8, 99)  # local header
    cd = good.rfind(b"PK\x01\x02")
    struct.pack_into("<H", data, cd + 10, 99)  # central directory
    return bytes(data)


def truncated_deflate() -> bytes:
    """The stream ends early: zlib returns fewer bytes than declared."""
    raw = zlib.compress(b"print(1)\n" * 500)[2:-4]
    good = zipped([("main.py", b"print(1)\n" * 500)])
    info = zipfile.ZipFile(io.BytesIO(good)).infolist()[0]
    start = info.header_offset + 30 + len(info.filename.encode())
    data = bytearray(good)
    half = raw[: len(raw) // 2]
    data[start : start + info.compress_size] = half + b"\0" * (info.compress_size - len(half))
    return bytes(data)


#: name -> (zip bytes builder, a word the rejection message must contain)
ZIP_CASES = {
    "nul-in-name": (nul_in_name, "NUL"),
    "file-and-dir": (file_and_dir_same_name, "both a file and a directory"),
    "dir-entry-and-file": (dir_entry_and_file_same_name, "both a file and a directory"),
    "duplicate": (duplicate_names, "more than once"),
    "duplicate-normalised": (duplicate_after_normalising, "more than once"),
    "long-component": (long_component, "at most 255 bytes"),
    "long-component-utf8": (long_component_multibyte, "at most 255 bytes"),
    "long-path": (long_path, "path"),
    "deep-path": (deep_path, "levels"),
    "corrupt-deflate": (corrupt_deflate, "cannot read"),
    "bad-crc": (bad_crc, "cannot read"),
    "unsupported-method": (unsupported_method, "cannot read"),
    "truncated-deflate": (truncated_deflate, "cannot read"),
}

#: name -> (relative keys under a prefix, message word)
PREFIX_CASES = {
    "file-and-dir": (["main.py", "a", "a/b"], "both a file and a directory"),
    "long-component": (["main.py", "y" * 256], "at most 255 bytes"),
    "duplicate-normalised": (["main.py", "./main.py"], "more than once"),
    "double-slash": (["main.py", "lib//u.py", "lib/u.py"], "more than once"),
}
