"""Every Redis client NanoGrid makes, in one factory, one per process and purpose.

Two kinds, because the callers need different things from an outage:

* ``observer`` (the tuner, the result stream, the CLI): 1 s connect / 2 s
  socket timeouts and no retries - a dead Redis must cost a run a couple of
  seconds at most, never stall it.
* ``durable`` (idempotency claims, where losing a write could run a request
  twice): rides out a Redis restart (~1-2 s here) with exponential-backoff
  retries for ~30 s before giving up.

Clients are cached per process (:class:`~nanogrid_celery.common.perprocess.PerProcess`),
so a client made before the prefork fork is never shared with a child.
"""

from __future__ import annotations

from typing import Literal

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from nanogrid_celery.common.perprocess import PerProcess

Kind = Literal["observer", "durable"]


def _build(key: tuple[str, Kind]) -> redis.Redis:
    url, kind = key
    if kind == "durable":
        return redis.Redis.from_url(
            url,
            socket_timeout=5,
            socket_connect_timeout=3,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=2, base=0.1), retries=20),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        health_check_interval=30,
    )


_clients: PerProcess[tuple[str, Kind], redis.Redis] = PerProcess(_build)


def get_redis(url: str, kind: Kind = "observer") -> redis.Redis:
    """This process's client for ``url`` (observer clients decode replies to str)."""
    return _clients.get((url, kind))
