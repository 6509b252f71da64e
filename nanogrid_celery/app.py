"""The Celery application; ``celery -A nanogrid_celery worker`` finds it as ``app``."""

from __future__ import annotations

from celery import Celery

app = Celery("nanogrid", include=["nanogrid_celery.tasks", "nanogrid_celery.service.worker"])
app.config_from_object("celeryconfig")
