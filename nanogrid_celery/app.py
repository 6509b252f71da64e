"""The Celery application; ``celery -A nanogrid_celery worker|inspect|status|events|flower``.

One app for workers, clients and monitoring tools: tasks travel on SQS, remote
control and events on the events Redis (:mod:`nanogrid_celery.monitoring.native`).
Its worker life cycle (bootstep and per-child hooks) is installed here, in one
call, instead of by whichever modules happen to be imported. Its tasks are
registered when the package is imported (``nanogrid_celery/__init__``), so
Flower and every client can apply ``nanogrid.run_code``.
"""

from __future__ import annotations

from nanogrid_celery.delivery.signing import setup_signing
from nanogrid_celery.monitoring.native import NanoGrid
from nanogrid_celery.service import lifecycle

app = NanoGrid("nanogrid", include=["nanogrid_celery.tasks", "nanogrid_celery.canvas"])
app.config_from_object("celeryconfig")
setup_signing(app)  # a no-op unless NANOGRID_SECURITY_KEY is set
lifecycle.install(app)
