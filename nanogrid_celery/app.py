"""The Celery application; ``celery -A nanogrid_celery worker`` finds it as ``app``.

Its worker life cycle (bootstep and per-child hooks) is installed here, in
one call, instead of by whichever modules happen to be imported.
"""

from __future__ import annotations

from celery import Celery

from nanogrid_celery.delivery.signing import setup_signing
from nanogrid_celery.service import lifecycle

app = Celery("nanogrid", include=["nanogrid_celery.tasks"])
app.config_from_object("celeryconfig")
setup_signing(app)  # a no-op unless NANOGRID_SECURITY_KEY is set
lifecycle.install(app)
