"""Bounded capture of a program's output, and lossless decoding of what was kept."""

from __future__ import annotations

import base64


class CappedBuffer:
    """Keeps the first ``cap`` bytes and counts the rest, so a 50 MB flood costs no memory."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.total = 0

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap


def decode(data: bytes, truncated: bool = False) -> tuple[str, str]:
    """UTF-8 text when it is valid, else base64 - never a lossy replacement.

    A cap can cut a multi-byte character in half; up to 3 trailing bytes are
    dropped in that one case so the text stays UTF-8.
    """
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        cut_char = exc.start >= len(data) - 3 and exc.reason == "unexpected end of data"
        if truncated and cut_char:
            return data[: exc.start].decode("utf-8"), "utf-8"
        return base64.b64encode(data).decode("ascii"), "base64"
