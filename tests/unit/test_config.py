from nanogrid_celery.config import Limits, Settings


def test_defaults_point_at_the_local_stack(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("NANOGRID_"):
            monkeypatch.delenv(key)
    s = Settings.from_env()
    assert s.broker_url.startswith("sqs://") and "127.0.0.1:5000" in s.broker_url
    assert s.result_backend.startswith("redis://127.0.0.1:6379")
    assert s.s3_endpoint == "http://127.0.0.1:5000"
    assert (s.pool_python, s.pool_cpp, s.pool_enabled) == (2, 1, True)
    assert s.limits == Limits()


def test_env_overrides_with_types(monkeypatch):
    monkeypatch.setenv("NANOGRID_POOL_PYTHON", "5")
    monkeypatch.setenv("NANOGRID_POOL_ENABLED", "false")
    monkeypatch.setenv("NANOGRID_CPUS", "0.5")
    monkeypatch.setenv("NANOGRID_DEFAULT_TIMEOUT_MS", "2500")
    monkeypatch.setenv("NANOGRID_S3_ENDPOINT_URL", "")
    s = Settings.from_env()
    assert s.pool_python == 5 and s.pool_enabled is False
    assert s.pool_size("python") == 0
    assert s.limits.cpus == 0.5 and s.limits.default_timeout_ms == 2500
    assert s.s3_endpoint is None


def test_credentials_for_emulator_only(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    assert Settings().s3_credentials() == {
        "aws_access_key_id": "test",
        "aws_secret_access_key": "test",
    }
    assert Settings(s3_endpoint_url="").s3_credentials() == {}
    explicit = Settings(aws_access_key_id="AK", aws_secret_access_key="SK").s3_credentials()
    assert explicit == {"aws_access_key_id": "AK", "aws_secret_access_key": "SK"}


def test_image_and_pool_per_runtime():
    s = Settings(python_image="p:1", cpp_image="c:1", pool_python=3, pool_cpp=4)
    assert (s.image_for("python"), s.image_for("cpp")) == ("p:1", "c:1")
    assert (s.pool_size("python"), s.pool_size("cpp")) == (3, 4)
