"""A plain boto3 SQS client for the same queues kombu uses.

Kombu owns receiving and acking; the reliability code needs a few calls kombu
does not make (extend a message's visibility, set a redrive policy, write to
the dead-letter queue), so it talks to SQS directly with the endpoint and
credentials taken from the broker URL, exactly as kombu reads them.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config

from nanogrid_celery.config import Settings

_local = threading.local()
_create_lock = threading.Lock()


def broker_endpoint(settings: Settings) -> tuple[str | None, dict[str, str]]:
    """(endpoint URL or None for real AWS, explicit credentials) from ``sqs://key:secret@host``."""
    url = urlparse(settings.broker_url)
    creds: dict[str, str] = {}
    if url.username:
        creds = {
            "aws_access_key_id": unquote(url.username),
            "aws_secret_access_key": unquote(url.password or ""),
        }
    if not url.hostname:
        return None, creds
    scheme = "https" if settings.sqs_secure else "http"
    port = f":{url.port}" if url.port else ""
    return f"{scheme}://{url.hostname}{port}", creds


def _build(endpoint: str | None, region: str, creds: tuple, timeout: float) -> Any:
    with _create_lock:  # boto3's default session is not safe to use from threads at once
        return boto3.client(
            "sqs",
            endpoint_url=endpoint,
            region_name=region,
            **dict(creds),
            config=Config(
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=timeout,
                read_timeout=timeout,
            ),
        )


def sqs_client(settings: Settings, timeout: float = 5.0) -> Any:
    """A boto3 SQS client, one per thread and endpoint (creating one costs ~50 ms)."""
    endpoint, creds = broker_endpoint(settings)
    key = (endpoint, settings.sqs_region, tuple(sorted(creds.items())), timeout)
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    if key not in cache:
        cache[key] = _build(*key)
    return cache[key]


def queue_url(client: Any, name: str) -> str:
    return client.get_queue_url(QueueName=name)["QueueUrl"]
