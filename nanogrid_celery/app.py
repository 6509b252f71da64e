"""The Celery application; ``celery -A nanogrid_celery worker`` finds it as ``app``.

Its worker life cycle (bootstep and per-child hooks) is installed here, in
one call, instead of by whichever modules happen to be imported.
"""

from __future__ import annotations

from celery import Celery

from nanogrid_celery.service import lifecycle

app = Celery("nanogrid", include=["nanogrid_celery.tasks"])
app.config_from_object("celeryconfig")
lifecycle.install(app)
