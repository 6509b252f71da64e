"""Publish every final result (rejected and internal errors too) to the Redis stream/channel.

Registered after the tuner so the published result carries the tuner's fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..events import ResultPublisher
from . import Middleware, RunContext

if TYPE_CHECKING:
    from ..config import Settings
    from ..result import ExecutionResult


class EventsMiddleware(Middleware):
    def __init__(self, settings: Settings, publisher: ResultPublisher | None = None) -> None:
        self.publisher = publisher or ResultPublisher(settings)

    def after_run(self, ctx: RunContext | None, result: ExecutionResult) -> None:
        self.publisher.publish(result)
