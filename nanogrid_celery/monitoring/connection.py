"""The kombu connection to the monitoring Redis (``events_broker_url``).

Monitoring must never stall a run or a submission, so the connection fails
fast - one attempt, a 2 s connect timeout, a 5 s socket timeout - instead of
kombu's default of retrying forever. None of the SQS transport options are
passed on: they mean nothing to Redis.
"""

from __future__ import annotations

from kombu import Connection

CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 5.0


def monitoring_connection(url: str) -> Connection:
    """A lazy kombu connection to ``url`` that gives up after one failed connect."""
    return Connection(
        url,
        connect_timeout=CONNECT_TIMEOUT_S,
        transport_options={
            "max_retries": 0,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": SOCKET_TIMEOUT_S,
        },
    )
