"""Celery settings, derived from :mod:`nanogrid_celery.config` (override with NANOGRID_* vars).

Delivery is at-least-once and safe: late acks, requeue when a worker dies,
prefetch 1 so a slow run never holds a second message hostage (the look-ahead,
nanogrid_celery/delivery/look_ahead.py, holds one briefly and only while runs are
short), and an SQS visibility timeout longer than the longest allowed run.
"""

import os

from nanogrid_celery.config import get_settings
from nanogrid_celery.delivery import signing as _signing
from nanogrid_celery.monitoring import sent_events as _sent_events  # noqa: F401 - client receiver

_s = get_settings()

broker_url = _s.broker_url
# kombu's SQS transport, but polling survives an SQS outage (see the module). Only for an SQS
# broker: `celery --broker=redis://... flower` (which sets CELERY_BROKER_URL) must stay on Redis.
broker_transport = (
    "nanogrid_celery.delivery.sqs_transport:Transport"
    if os.environ.get("CELERY_BROKER_URL", broker_url).startswith("sqs://")
    else None
)
broker_transport_options = {
    "region": _s.sqs_region,
    "is_secure": _s.sqs_secure,
    "wait_time_seconds": _s.sqs_wait_seconds,
    "polling_interval": 0,
    "visibility_timeout": _s.visibility_timeout,
    "prompt_receive": _s.sqs_prompt_receive,
    "async_ack": _s.sqs_async_ack,
    "look_ahead_hold_s": _s.sqs_look_ahead_hold_ms / 1000,
    "look_ahead_visibility_s": _s.sqs_look_ahead_visibility_s,
    "max_receives": _s.dlq_max_receives,  # the redrive policy (deadletter.py)
    "requeue_delay_seconds": _s.sqs_requeue_delay_s,
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
# The worker's own life cycle (visibility heartbeat, dead-letter queue, metrics, the runner)
# is installed by nanogrid_celery.app (service/lifecycle.py), not through `imports`.
# WorkerConsumer = the dead-letter consumer + events/remote control over Redis (no SQS fanout)
worker_consumer = "nanogrid_celery.service.consumer:WorkerConsumer"
worker_send_task_events = bool(_s.events_broker_url)
# Celery would send task-sent on the task's SQS producer, where it is dropped; the client's
# task-sent events go to Redis through monitoring.sent_events (imported above) instead.
task_send_sent_event = False
# opt-in message signing (NANOGRID_SECURITY_KEY/CERT/CERT_STORE): tasks use Celery's "auth"
# serializer and only signed ones are accepted; app.py registers it (delivery/signing.py)
globals().update(_signing.celery_security_settings(_s))
worker_hijack_root_logger = True
worker_redirect_stdouts = False
timezone = "UTC"
