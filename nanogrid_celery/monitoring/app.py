"""The Celery app as monitoring tools should see it - Flower, ``celery inspect``/``control``::

    celery -A nanogrid_celery.monitoring.app flower --port=5555
    celery -A nanogrid_celery.monitoring.app inspect active

It is configured like the task app (``celeryconfig``), with three changes:

* its broker is the monitoring Redis (``NANOGRID_EVENTS_BROKER_URL``), where
  workers send their events and listen for remote control - not SQS, which
  carries neither (``--broker=...`` still overrides it);
* no SQS transport or transport options;
* no broker connection pool. kombu's Redis transport can hand a pooled
  connection to the next control call while a BRPOP for the previous call's
  reply queue is still pending on it; that call then never reads its own
  replies. In Flower, whose thread pool mixes threads and pooled connections,
  most inspect calls came back empty and pool grow/shrink answered 403;
  with a fresh connection per call (a few ms) every reply arrives.
"""

from __future__ import annotations

from celery import Celery

from nanogrid_celery.config import get_settings


def monitoring_app() -> Celery:
    """A Celery app of its own (the task app is left untouched), configured as above."""
    mon = Celery("nanogrid", set_as_current=False)
    mon.config_from_object("celeryconfig")
    overrides: dict = {
        "broker_transport": None,
        "broker_transport_options": {},
        "broker_pool_limit": 0,
    }
    if get_settings().events_broker_url:
        overrides["broker_url"] = get_settings().events_broker_url
    mon.conf.update(overrides)
    return mon


app = monitoring_app()

__all__ = ["app", "monitoring_app"]
