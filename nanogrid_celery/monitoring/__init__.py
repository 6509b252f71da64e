"""Monitoring that works with an SQS broker: Celery events and remote control over Redis
(:mod:`.events_consumer`, :mod:`.sent_events`) and Prometheus metrics (:mod:`.metrics`).

See docs/monitoring.md for how the pieces fit and how to run Flower against them.
"""
