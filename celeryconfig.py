"""Celery settings, derived from :mod:`nanogrid_celery.config` (override with NANOGRID_* vars).

Delivery is at-least-once and safe: late acks, requeue when a worker dies,
prefetch 1 so a slow run never holds a second message hostage, and an SQS
visibility timeout longer than the longest allowed run.
"""

from nanogrid_celery.config import get_settings

_s = get_settings()

broker_url = _s.broker_url
broker_transport_options = {
    "region": _s.sqs_region,
    "is_secure": _s.sqs_secure,
    "wait_time_seconds": _s.sqs_wait_seconds,
    "polling_interval": 0,
    "visibility_timeout": _s.visibility_timeout,
}
broker_connection_retry_on_startup = True
result_backend = _s.result_backend
result_expires = _s.result_expires
result_extended = True

task_default_queue = _s.queue
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_hijack_root_logger = True
worker_redirect_stdouts = False
timezone = "UTC"
