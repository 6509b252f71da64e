"""``nanogrid watch``: follow the results stream for as long as the user lets it.

The old loop used the observer Redis client (2 s socket timeout) with a 5 s
``XREAD BLOCK``, so a quiet stream killed it within seconds ("Timeout reading
from socket"), and a Redis restart ended it. :func:`follow` owns its client:

* ``XREAD BLOCK`` waits at most half the socket timeout, so a quiet stream
  is a loop of empty replies, never a socket timeout - it waits forever;
* on a connection error or timeout it reconnects with backoff (0.5 s doubling
  to 10 s, a note on stderr) and resumes after the last entry it printed:
  entries added while it was away are printed, none twice (stream ids are
  time-ordered, so a restarted, emptied Redis continues above the old ids);
* filters (``--status``, ``--function``) are applied to each entry's flat
  fields, before the JSON body is parsed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nanogrid_celery.config import get_settings
from nanogrid_celery.middleware.result_stream import parse_entry

DEFAULT_SOCKET_TIMEOUT_S = 30.0
RECONNECT_MAX_S = 10.0


def connect(url: str, socket_timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=min(socket_timeout_s, 5.0),
        socket_timeout=socket_timeout_s,
    )


def wanted(fields: dict[str, str], statuses: set[str], function: str | None) -> bool:
    """Does a stream entry (its flat fields) pass the ``--status``/``--function`` filters?"""
    if statuses and fields.get("status") not in statuses:
        return False
    return not (function and fields.get("function") != function)


def follow(
    url: str,
    stream: str,
    last_id: str = "$",
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    on_reconnect: Callable[[Exception, float], None] | None = None,
    make_client: Callable[[str, float], redis.Redis] = connect,
) -> Iterator[tuple[str, dict[str, str]]]:
    """(entry id, flat fields) for every entry after ``last_id``, forever, across outages."""
    block_ms = max(100, int(socket_timeout_s * 1000 / 2))
    backoff = 0.5
    client: redis.Redis | None = None
    while True:
        try:
            if client is None:
                client = make_client(url, socket_timeout_s)
                if last_id == "$":  # pin "now" once, so a reconnect does not skip entries
                    entries = client.xrevrange(stream, count=1)
                    last_id = entries[0][0] if entries else "0-0"
            reply = client.xread({stream: last_id}, count=100, block=block_ms)
            backoff = 0.5
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if on_reconnect is not None:
                on_reconnect(exc, backoff)
            if client is not None:
                client.close()
            client = None
            time.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)
            continue
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id
                yield entry_id, fields


def _statuses(values: list[str] | None) -> set[str]:
    return {s.strip() for v in values or [] for s in v.split(",") if s.strip()}


def cmd_watch(args: argparse.Namespace, format_event: Callable[[dict[str, Any]], str]) -> int:
    settings = get_settings()
    url = args.redis_url or settings.redis_url
    stream = args.stream or settings.events_stream
    statuses = _statuses(args.status)
    shown = 0

    def emit(fields: dict[str, str]) -> bool:
        nonlocal shown
        if not wanted(fields, statuses, args.function):
            return True
        try:
            ev = parse_entry(fields)
        except (KeyError, ValueError):
            return True
        print(json.dumps(ev) if args.json else format_event(ev), flush=True)
        shown += 1
        return not (args.count and shown >= args.count)

    def note(exc: Exception, retry_in: float) -> None:
        msg = f"nanogrid watch: Redis unavailable ({exc}); retrying in {retry_in:g}s"
        print(msg, file=sys.stderr, flush=True)

    last_id = "$"
    if args.last:
        client = connect(url, args.socket_timeout)
        for entry_id, fields in reversed(client.xrevrange(stream, count=args.last)):
            last_id = entry_id
            if not emit(fields):
                return 0
        client.close()
    try:
        for _entry_id, fields in follow(url, stream, last_id, args.socket_timeout, note):
            if not emit(fields):
                return 0
    except KeyboardInterrupt:
        return 0
    return 0


def add_arguments(watch: argparse.ArgumentParser) -> None:
    watch.add_argument("--last", type=int, default=0, help="first print the last N results")
    watch.add_argument("--function", help="only this function")
    watch.add_argument(
        "--status", action="append", help="only these statuses (error,timeout,...; repeatable)"
    )
    watch.add_argument("--count", type=int, default=0, help="exit after N lines")
    watch.add_argument("--json", action="store_true", help="print each event as JSON")
    watch.add_argument("--stream", help="stream key (default: NANOGRID_EVENTS_STREAM)")
    watch.add_argument("--redis-url", help="Redis with the stream (default: NANOGRID_REDIS_URL)")
    watch.add_argument(
        "--socket-timeout",
        type=float,
        default=DEFAULT_SOCKET_TIMEOUT_S,
        help="seconds; each wait on Redis lasts half of it (default 30)",
    )
