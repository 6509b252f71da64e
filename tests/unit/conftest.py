"""Fixtures shared by the unit tests."""

import boto3
import pytest
from kombu.asynchronous import Hub
from moto import mock_aws

from nanogrid_celery.config import Settings
from nanogrid_celery.execution import storage


@pytest.fixture
def s3(monkeypatch):
    """In-process mocked S3 with bucket ``code``; clients and the submission cache reset."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    storage._clients.clear()
    storage.CACHE.clear()
    with mock_aws():
        settings = Settings(s3_endpoint_url="", s3_bucket="code")
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="code")
        yield settings
    storage._clients.clear()
    storage.CACHE.clear()


@pytest.fixture
def hub():
    """A fresh kombu event loop (drive it with tests/unit/event_loop.spin)."""
    hub = Hub()
    yield hub
    hub.close()
