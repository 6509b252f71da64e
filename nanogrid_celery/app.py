"""The Celery application; ``celery -A nanogrid_celery worker|inspect|status|events|flower``.

One app for workers, clients and monitoring tools: tasks travel on SQS, remote
control and events on the events Redis (:mod:`nanogrid_celery.monitoring.native`).
Its worker life cycle (bootstep and per-child hooks) is installed here, in one
call, instead of by whichever modules happen to be imported; its tasks are
registered on import, so Flower and any client can apply ``nanogrid.run_code``.
"""

from __future__ import annotations

from nanogrid_celery.monitoring.native import NanoGrid
from nanogrid_celery.service import lifecycle

app = NanoGrid("nanogrid", include=["nanogrid_celery.tasks", "nanogrid_celery.canvas"])
app.config_from_object("celeryconfig")
lifecycle.install(app)

from nanogrid_celery import canvas as _canvas  # noqa: E402,F401 - registers nanogrid.* tasks
from nanogrid_celery import tasks as _tasks  # noqa: E402,F401
