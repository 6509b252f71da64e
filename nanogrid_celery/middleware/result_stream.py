"""Every final ExecutionResult, published to Redis for a control plane.

Two ways to consume, one message format (see docs/events.md): a Stream
(``XADD ... MAXLEN ~ N``) that a consumer group reads without loss, and a
pub/sub channel for live listeners. Outputs are cut to
``events_output_max_chars`` so the bounded stream stays small; the full result
is still in the Celery result backend. Publishing is best effort: a Redis
outage is logged and the run goes on. :class:`ResultStreamMiddleware` publishes
every final result (rejected and internal errors too); it is registered after
the tuner so the published result carries the tuner's fields.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.exceptions import RedisError

from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.common.redis import get_redis
from nanogrid_celery.config import Settings
from nanogrid_celery.middleware import Middleware, RunContext
from nanogrid_celery.result import ExecutionResult

log = get_logger(__name__)

EVENT_VERSION = 1


def event_payload(
    result: ExecutionResult, output_max_chars: int, case_output_max_chars: int = 256
) -> dict[str, Any]:
    """The message body: the result's fields plus event metadata, outputs capped.

    A batch's cases (at most ``max_cases``) keep ``case_output_max_chars`` of each
    output, so a 100-case event stays under ~60 KB whatever the programs printed.
    """
    data = result.to_dict()
    cut = False
    for entry, cap in [(data, output_max_chars)] + [
        (case, case_output_max_chars) for case in data.get("cases") or []
    ]:
        for name in ("stdout", "stderr"):
            text = entry.get(name) or ""
            if cap >= 0 and len(text) > cap:
                entry[name] = text[:cap]
                cut = True
    data["output_cut"] = cut
    data["event_version"] = EVENT_VERSION
    data["published_at"] = round(time.time(), 6)
    return data


def stream_fields(payload: dict[str, Any]) -> dict[str, str]:
    """Stream entry: the JSON body plus a few flat fields consumers can filter on cheaply."""
    return {
        "request_id": str(payload.get("request_id") or ""),
        "function": str(payload.get("function") or ""),
        "status": str(payload.get("status") or ""),
        "result": json.dumps(payload, separators=(",", ":")),
    }


def parse_entry(fields: dict[str, str]) -> dict[str, Any]:
    """The payload of one stream entry (the inverse of :func:`stream_fields`)."""
    return json.loads(fields["result"])


class ResultPublisher:
    """XADD + PUBLISH each result; never raises."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self._client = client

    @property
    def redis(self) -> redis.Redis:
        return self._client or get_redis(self.settings.redis_url)

    def publish(self, result: ExecutionResult) -> str | None:
        """The stream entry id, or None if Redis could not be reached."""
        s = self.settings
        try:
            payload = event_payload(
                result, s.events_output_max_chars, s.events_case_output_max_chars
            )
            fields = stream_fields(payload)
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(s.events_stream, fields, maxlen=s.events_maxlen, approximate=True)
            pipe.publish(s.events_channel, fields["result"])
            entry_id, _listeners = pipe.execute()
            return entry_id
        except (RedisError, OSError, TypeError, ValueError) as exc:
            log.warning(
                "could not publish result event: %s",
                exc,
                stream=s.events_stream,
            )
            return None


def tail(
    client: redis.Redis, stream: str, last_id: str = "$", block_ms: int = 5000
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Follow ``stream`` from after ``last_id`` forever, yielding (entry id, payload)."""
    while True:
        reply = client.xread({stream: last_id}, count=100, block=block_ms)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id
                try:
                    yield entry_id, parse_entry(fields)
                except (KeyError, ValueError):
                    log.warning("skipping malformed event %s", entry_id)


class ResultStreamMiddleware(Middleware):
    """Publishes each final result (``after_run``) through a :class:`ResultPublisher`."""

    def __init__(self, settings: Settings, publisher: ResultPublisher | None = None) -> None:
        self.publisher = publisher or ResultPublisher(settings)

    def after_run(
        self, ctx: RunContext, result: ExecutionResult, exc: BaseException | None = None
    ) -> None:
        self.publisher.publish(result)
