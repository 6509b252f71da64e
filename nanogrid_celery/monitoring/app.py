"""Old name of the NanoGrid app, kept so existing commands keep working::

    celery -A nanogrid_celery.monitoring.app --broker=redis://<events-redis>/1 flower

It is :data:`nanogrid_celery.app.app` - tasks on SQS, events and remote control
on the events Redis - so use ``celery -A nanogrid_celery`` instead. Before that
app existed, this one's *broker* was the events Redis, and commands passed it
as ``--broker=redis://...`` (``CELERY_BROKER_URL``). Such a URL is taken here
as the events broker, so those commands watch the same Redis as before and
Flower's task API sends to SQS like every other client.
"""

from __future__ import annotations

import os

from nanogrid_celery.config import get_settings

_legacy = os.environ.get("CELERY_BROKER_URL", "")
if _legacy and not _legacy.startswith("sqs://"):
    os.environ["NANOGRID_EVENTS_BROKER_URL"] = os.environ.pop("CELERY_BROKER_URL")
    get_settings.cache_clear()

from nanogrid_celery.app import app  # noqa: E402

__all__ = ["app"]
