"""The worker's Consumer class (``worker_consumer``): Celery's, plus each concern's mixin.

* :class:`~nanogrid_celery.monitoring.events_consumer.RedisEventsMixin` - events and
  remote control over Redis, since SQS has no fanout (docs/monitoring.md);
* :class:`~nanogrid_celery.deadletter.DeadLetterConsumer` - messages that cannot run
  go to the dead-letter queue.
"""

from __future__ import annotations

from .deadletter import DeadLetterConsumer
from .monitoring.events_consumer import RedisEventsMixin


class WorkerConsumer(RedisEventsMixin, DeadLetterConsumer):
    """Every consumer customisation in one class; mixins first."""
