"""Opt-in message signing: only holders of a trusted key can make a worker run code.

Whoever can put a message on the queue can make a worker run anything it can
fetch (see docs/threat-model.md). When the queue is shared with parties that are
not fully trusted, set ``NANOGRID_SECURITY_KEY`` (PEM private key),
``NANOGRID_SECURITY_CERT`` (its certificate) and ``NANOGRID_SECURITY_CERT_STORE``
(a directory or glob of the certificates whose signatures are accepted):
celeryconfig.py then switches tasks to Celery's ``auth`` serializer and
:func:`setup_signing` registers it (``app.setup_security``), in the worker and in
every client, which needs the key to send. A worker then refuses any task
message that is unsigned, signed by a certificate outside the store, or altered
after signing; the refusal goes the dead-letter way, nothing is run. Results,
events and Redis traffic stay JSON (the result backend is not signed: protect
Redis itself). Remote control messages are signed too, so Flower's control
buttons need the key as well.
"""

from __future__ import annotations

from celery import Celery

from nanogrid_celery.config import Settings, get_settings


def signing_enabled(settings: Settings) -> bool:
    return bool(settings.security_key)


def celery_security_settings(settings: Settings) -> dict[str, object]:
    """The Celery settings that turn signing on (empty when it is off)."""
    if not signing_enabled(settings):
        return {}
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "result_accept_content": ["json"],
        "security_key": settings.security_key,
        "security_certificate": settings.security_cert,
        "security_cert_store": settings.security_cert_store,
        "security_digest": "sha256",
    }


def setup_signing(app: Celery, settings: Settings | None = None) -> bool:
    """Register the ``auth`` serializer when signing is configured; True if it is on."""
    settings = settings or get_settings()
    if not signing_enabled(settings):
        return False
    # json stays enabled for results, events and remote-control replies; the task
    # queue accepts only "auth" (accept_content above)
    app.setup_security(allowed_serializers=["json", "application/json"], serializer="json")
    return True
