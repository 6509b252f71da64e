"""Objects built on first use and rebuilt in any process that did not build them.

A socket (Redis, Docker, boto3's connection pool) must never be shared across
the prefork fork: two processes reading one connection interleave replies.
Every such object in NanoGrid lives in a :class:`PerProcess` cache, keyed as
the caller likes and stamped with the pid that built it; a child that finds
its parent's object builds its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PerProcess(Generic[K, V]):
    """``get(key)`` returns this process's object for ``key``, built by ``factory(key)``."""

    def __init__(self, factory: Callable[[K], V]) -> None:
        self._factory = factory
        self._items: dict[K, tuple[int, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V:
        pid = os.getpid()
        with self._lock:
            entry = self._items.get(key)
            if entry is None or entry[0] != pid:
                entry = self._items[key] = (pid, self._factory(key))
            return entry[1]

    def peek(self, key: K) -> V | None:
        """This process's object for ``key`` if it exists; never builds one."""
        with self._lock:
            entry = self._items.get(key)
        return entry[1] if entry is not None and entry[0] == os.getpid() else None

    def pop(self, key: K) -> V | None:
        """Forget ``key``; returns the object if this process built it (to close it)."""
        with self._lock:
            entry = self._items.pop(key, None)
        return entry[1] if entry is not None and entry[0] == os.getpid() else None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
