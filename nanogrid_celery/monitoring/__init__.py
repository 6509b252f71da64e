"""Monitoring that works with an SQS broker: Celery events and remote control over Redis
(the worker side in :mod:`.redis_events`, the client side - ``app.control``, ``app.events``,
Flower - in :mod:`.native`, task-sent events in :mod:`.sent_events`), the run's status in
task events (:mod:`.run_state`) and Prometheus metrics (:mod:`.prometheus`).

See docs/monitoring.md for how the pieces fit and how to run Flower against them.
"""
