"""One Redis client per process and URL, created on first use.

Clients are built lazily and keyed by pid, so a client created before the
prefork fork is never shared with a child (a shared socket interleaves
replies); short timeouts keep a dead Redis from stalling a run for long.
"""

from __future__ import annotations

import os
import threading

import redis

_clients: dict[str, tuple[int, redis.Redis]] = {}
_lock = threading.Lock()


def get_redis(url: str) -> redis.Redis:
    """The process's client for ``url`` (string replies, 1 s connect / 2 s socket timeouts)."""
    pid = os.getpid()
    with _lock:
        entry = _clients.get(url)
        if entry is None or entry[0] != pid:
            client = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=1.0,
                socket_timeout=2.0,
                health_check_interval=30,
            )
            entry = _clients[url] = (pid, client)
        return entry[1]
