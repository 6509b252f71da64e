"""Message signing is opt-in and, when on, accepts only the ``auth`` serializer for tasks."""

from nanogrid_celery.config import Settings
from nanogrid_celery.delivery.signing import celery_security_settings, signing_enabled


def test_signing_is_off_by_default():
    assert not signing_enabled(Settings())
    assert celery_security_settings(Settings()) == {}


def test_signing_settings_accept_only_signed_tasks_and_json_results():
    s = Settings(security_key="/k.pem", security_cert="/c.pem", security_cert_store="/store")
    conf = celery_security_settings(s)
    assert conf["task_serializer"] == "auth" and conf["accept_content"] == ["auth"]
    assert conf["result_accept_content"] == ["json"]
    assert (conf["security_key"], conf["security_certificate"], conf["security_cert_store"]) == (
        "/k.pem",
        "/c.pem",
        "/store",
    )
