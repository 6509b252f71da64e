"""The worker's Consumer class (``worker_consumer``): Celery's, plus each concern's mixin.

* :class:`~nanogrid_celery.monitoring.redis_events.RedisEventsMixin` - events and
  remote control over Redis, since SQS has no fanout (docs/monitoring.md);
* :class:`~nanogrid_celery.delivery.deadletter.DeadLetterConsumer` - messages that cannot run
  go to the dead-letter queue.
"""

from __future__ import annotations

from nanogrid_celery.delivery.deadletter import DeadLetterConsumer
from nanogrid_celery.monitoring.redis_events import RedisEventsMixin


class WorkerConsumer(RedisEventsMixin, DeadLetterConsumer):
    """Every consumer customisation in one class; mixins first."""
