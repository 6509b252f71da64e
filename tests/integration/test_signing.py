"""Issue 11, class 8: opt-in message signing, through a real worker over moto SQS.

A worker started with NANOGRID_SECURITY_KEY/CERT/CERT_STORE accepts only task
messages signed by a certificate in its store: an unsigned message (the plain
JSON client), one signed by a key it does not trust and one signed by the trusted
key but altered afterwards are refused and never run, while a signed one runs.
Keys and certificates are made here with ``cryptography``.
"""

from __future__ import annotations

import datetime
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery
from celery.result import AsyncResult
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer, register_auth
from celery.utils.serialization import b64decode, b64encode
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from kombu.serialization import registry
from kombu.utils.encoding import ensure_bytes

import celeryconfig
from nanogrid_celery import client
from nanogrid_celery.app import app as main_app
from nanogrid_celery.result import ExecutionResult, Status

from .harness import WorkerProcess

pytestmark = pytest.mark.integration


def make_identity(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed RSA key + certificate as PEM files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def signer_app(key: Path, cert: Path, store: Path) -> Celery:
    """A client app like ours, but sending with the ``auth`` serializer."""
    signer = Celery("signer")
    conf = {k: getattr(celeryconfig, k) for k in dir(celeryconfig) if k.islower() and k[0] != "_"}
    conf.update(
        task_serializer="auth",
        accept_content=["auth"],
        result_accept_content=["json"],
        security_key=str(key),
        security_certificate=str(cert),
        security_cert_store=str(store),
    )
    signer.conf.update(conf)
    return signer


def _register(key: Path, cert: Path, store: Path) -> None:
    """Point the process-wide ``auth`` serializer at this identity."""
    register_auth(key.read_text(), None, cert.read_text(), str(store), "sha256", "json")


def _register_tampering(key: Path, cert: Path, store: Path) -> None:
    """Sign correctly with the trusted key, then alter the signed body in transit."""
    good = SecureSerializer(
        PrivateKey(key.read_text()), Certificate(cert.read_text()), FSCertStore(str(store))
    )

    def tamper(data):
        raw = b64decode(ensure_bytes(good.serialize(data)))
        altered = raw.replace(b'"runtime": "python"', b'"runtime": "cpp"')
        assert altered != raw
        return b64encode(altered)

    registry.register(
        "auth", tamper, good.deserialize, content_type="application/data", content_encoding="utf-8"
    )


@pytest.fixture
def identities(tmp_path):
    store = tmp_path / "trusted"
    store.mkdir()
    trusted = make_identity(tmp_path, "nanogrid-client")
    (store / "nanogrid-client.pem").write_bytes(trusted[1].read_bytes())
    forger = make_identity(tmp_path, "forger")
    yield store, trusted, forger
    registry._set_default_serializer("json")  # setup_security made "auth" the default


def test_only_signed_messages_run(identities):
    store, (key, cert), (bad_key, bad_cert) = identities
    w = WorkerProcess(
        "signing",
        pool_python=1,
        pool_cpp=0,
        security_key=key,
        security_cert=cert,
        security_cert_store=store / "*.pem",
    ).start()
    try:
        signer = signer_app(key, cert, store / "*.pem")
        signer.setup_security(allowed_serializers=["json", "application/json"])
        tag = uuid.uuid4().hex[:8]
        bucket, code_key = client.upload_code({"main.py": "print('signed ran')"})

        def kwargs(rid: str) -> dict:
            return {
                "request_id": rid,
                "runtime": "python",
                "s3_bucket": bucket,
                "s3_key": code_key,
                "submitted_at": time.time(),
            }

        unsigned = f"unsigned-{tag}"
        client.enqueue(unsigned, "python", bucket, code_key, queue=w.queue)  # plain JSON
        forged = f"forged-{tag}"
        _register(bad_key, bad_cert, store / "*.pem")  # a key the worker does not trust
        signer.send_task("nanogrid.run_code", kwargs=kwargs(forged), task_id=forged, queue=w.queue)
        tampered = f"tampered-{tag}"
        _register_tampering(key, cert, store / "*.pem")
        signer.send_task(
            "nanogrid.run_code", kwargs=kwargs(tampered), task_id=tampered, queue=w.queue
        )
        signed = f"signed-{tag}"
        _register(key, cert, store / "*.pem")
        signer.send_task("nanogrid.run_code", kwargs=kwargs(signed), task_id=signed, queue=w.queue)

        ok = ExecutionResult.from_dict(AsyncResult(signed, app=main_app).get(timeout=60))
        assert ok.status == Status.SUCCESS and ok.stdout == "signed ran\n", ok
        refusals = ("untrusted content of type json", "Unknown certificate: b'forger")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            log = w.log_tail(1000)
            lettered = {ln.rsplit("task_id=", 1)[-1] for ln in log.splitlines() if "lettered" in ln}
            if all(r in log for r in refusals) and {unsigned, forged, tampered} <= lettered:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"three messages should be refused:\n{w.log_tail(40)}")
        # refused and dead-lettered: no result, no run. (A tampered body is refused, but Celery
        # 5.7 reports it as a TypeError: security/utils.py catches the *module*
        # cryptography.exceptions, so InvalidSignature escapes as "catching classes that do
        # not inherit from BaseException"; the outer decode wrapper still refuses it.)
        for rid in (unsigned, forged, tampered):
            assert AsyncResult(rid, app=main_app).state == "PENDING", rid
            assert f"req={rid}" not in log, f"{rid} reached the runner"
        assert w.proc.poll() is None
    finally:
        w.stop()
    assert w.containers() == []
