"""Driving kombu's real event loop (the hub) from a unit test, pass by pass."""

from __future__ import annotations

import time
from typing import Any

from kombu.asynchronous import Hub


def spin(hub: Hub, seconds: float, until: Any = None) -> None:
    """Run the event loop's passes for up to ``seconds`` (or until ``until()``)."""
    loop = hub.create_loop()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        next(loop)
