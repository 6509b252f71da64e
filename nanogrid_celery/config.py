"""All settings in one typed place, read from ``NANOGRID_*`` environment variables.

Defaults point at the local stack that ``make up`` starts (moto on :5000 for SQS
and S3, Redis on :6379, images built by ``nanogrid images build``), so a
newcomer needs no configuration; production overrides the URLs and nothing
in the code changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

PREFIX = "NANOGRID_"


def _env(name: str, default: Any) -> Any:
    """Read ``NANOGRID_<NAME>`` and convert it to the type of ``default``."""
    raw = os.environ.get(PREFIX + name.upper())
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


@dataclass(frozen=True)
class Limits:
    """Per-run limits: defaults apply when a task names none, maxima bound what it may ask."""

    default_timeout_ms: int = 10_000
    max_timeout_ms: int = 120_000
    default_memory_mb: int = 256
    min_memory_mb: int = 32
    max_memory_mb: int = 2048
    compile_timeout_ms: int = 60_000
    compile_memory_mb: int = 1024
    pids: int = 128
    cpus: float = 1.0
    stdout_max_bytes: int = 1 << 20
    stderr_max_bytes: int = 1 << 20
    max_code_bytes: int = 10 << 20
    max_unpacked_bytes: int = 64 << 20
    max_files: int = 2000
    max_stdin_bytes: int = 8 << 20
    tmpfs_mb: int = 256
    # test-case batches (issue 16): cases per request, the cases document's size, and the
    # stdout/stderr each case keeps in the result (its verdict sees the full captured output)
    max_cases: int = 100
    max_cases_bytes: int = 64 << 20
    case_output_max_bytes: int = 64 << 10


@dataclass(frozen=True)
class Settings:
    """Everything the worker, client and CLI need; build with :func:`get_settings`."""

    broker_url: str = "sqs://test:test@127.0.0.1:5000"
    sqs_region: str = "us-east-1"
    sqs_secure: bool = False
    sqs_wait_seconds: int = 20
    # issue 17 (sqs_transport.py): receive as soon as a slot frees; false = kombu's own loop
    sqs_prompt_receive: bool = True
    sqs_async_ack: bool = True  # the ack frees the slot; DeleteMessage follows (async_ack.py)
    # while every slot is busy, receive the next message and hold it this long for the slot
    # that frees first (look_ahead.py); 0 = off. Its receive hides it for the visibility below
    sqs_look_ahead_hold_ms: int = 500
    sqs_look_ahead_visibility_s: int = 30
    sqs_requeue_delay_s: int = 0  # a requeued message (its pool child died) is visible again
    queue: str = "nanogrid-runs"
    visibility_timeout: int = 600
    # reliability (issue 7): see visibility.py, idempotency.py, deadletter.py
    visibility_margin_s: int = 60
    claim_ttl_s: int = 30
    duplicate_delay_s: int = 5
    max_starts: int = 3
    dlq_max_receives: int = 5
    dead_letter_queue: str = ""
    result_backend: str = "redis://127.0.0.1:6379/0"
    result_expires: int = 86_400
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint_url: str = "http://127.0.0.1:5000"
    s3_bucket: str = "nanogrid-code"
    s3_region: str = "us-east-1"
    aws_access_key_id: str = ""
    aws_secret_access_key: str = ""
    # the trust boundary for code (issue 11): comma list of `bucket` or `bucket/prefix` a task
    # may name; "" = the code bucket (s3_bucket) only. See execution/locations.py.
    allowed_code_locations: str = ""
    # opt-in message signing (delivery/signing.py): PEM key, its certificate, trusted certs
    security_key: str = ""
    security_cert: str = ""
    security_cert_store: str = ""
    python_image: str = "nanogrid-python:latest"
    cpp_image: str = "nanogrid-cpp:latest"
    pool_enabled: bool = True
    pool_python: int = 2  # the minimum kept warm per worker process
    pool_cpp: int = 1
    # demand-sized pools (sandbox/demand.py): grow to recent peak concurrency, decay after the TTL;
    # max 0 = auto: the process's task slots under -P threads, else the minimum (prefork: fixed)
    pool_max_python: int = 0
    pool_max_cpp: int = 0
    pool_idle_ttl_s: float = 60.0
    pool_host_max_containers: int = 64  # host-wide, all worker processes; 0 = no cap
    pool_host_max_memory_mb: int = 0  # sum of container memory limits; 0 = half the host's RAM
    # fast path (issue 4): "agent" runs through the in-container agent, "exec" via docker exec
    executor: str = "agent"
    agent_zygote: bool = True  # python runs fork from a warm interpreter instead of exec'ing one
    pause_grace_ms: int = 500  # an idle container is paused this long after release; 0 = at once
    s3_cache_entries: int = 512  # submissions cached by (bucket, key, ETag); 0 = off
    s3_cache_mb: int = 64
    # C++ build cache (issue 16): host-wide under work_root/.build-cache; 0 = off
    build_cache_mb: int = 512
    build_cache_max_binary_mb: int = 64
    # stdin / cases larger than this travel through S3 (inputs/sha256-<hex>/...), not SQS
    input_inline_max_bytes: int = 128 << 10
    work_root: str = "/var/lib/nanogrid"
    instance: str = "local"
    sandbox_user: str = "65534:65534"
    log_json: bool = False
    log_level: str = "INFO"
    # auto-tuner: limit = clamp(round_up(p95(peak) * headroom + floor, step), min, max)
    tuner_enabled: bool = True
    tuner_headroom: float = 1.5
    tuner_floor_mb: int = 16
    tuner_step_mb: int = 32
    tuner_min_mb: int = 64
    tuner_max_mb: int = 1024
    tuner_min_runs: int = 5
    tuner_history: int = 50
    tuner_ttl_seconds: int = 7 * 86_400
    tuner_max_functions: int = 100_000
    tuner_prefix: str = "nanogrid:tuner"
    # result events: every ExecutionResult on a bounded stream and a pub/sub channel
    events_enabled: bool = True
    events_stream: str = "nanogrid:results"
    events_channel: str = "nanogrid:results"
    events_maxlen: int = 10_000
    events_output_max_chars: int = 4096
    events_case_output_max_chars: int = 256  # per case of a batch, stdout and stderr each
    # monitoring: Celery events + remote control over Redis (SQS has no fanout), so Flower
    # works with `--broker=<events_broker_url>`; "" turns both off
    events_broker_url: str = "redis://127.0.0.1:6379/1"
    # task events are sent at most this long after they happen, together (monitoring/
    # redis_events.py); 0 = on the next event-loop pass, as stock Celery does
    events_flush_ms: int = 100
    # Prometheus endpoint served by the worker's main process; 0 = off
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # dependencies (issue 15): requirements.txt environments, built once per host, see
    # sandbox/envs.py; the pip_* overrides replace the host's pip configuration entirely
    deps_enabled: bool = True
    deps_dir: str = ""  # "" = <work_root>/envs
    deps_cache_mb: int = 4096  # every built environment together; least recently used evicted
    deps_max_env_mb: int = 1024  # one environment (downloaded wheels and installed files)
    deps_build_timeout_s: int = 300
    deps_max_requirements: int = 100
    pip_index_url: str = ""
    pip_extra_index_url: str = ""  # space-separated, as pip's own option
    pip_find_links: str = ""  # a local wheel folder; alone, it is the only source (no index)
    prebuilt_envs: str = ""  # "numpy;pandas,six": requirement sets (lines split by ",") warmed
    # result callbacks (delivery/callbacks.py): the worker POSTs a run's signed result to its
    # callback_url; no secret = off. allow: comma-separated host[:port] patterns ("" = any host
    # with a public address); private/loopback/link-local only for an exact (wildcard-free) one
    callback_secret: str = ""
    callback_allow: str = ""
    callback_timeout_s: float = 5.0
    callback_attempts: int = 5
    callback_backoff_s: float = 1.0
    callback_queue_max: int = 1000
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls) -> Settings:
        """Read every field from ``NANOGRID_<FIELD>`` (limits too, e.g. NANOGRID_PIDS)."""
        limits = Limits(**{f.name: _env(f.name, f.default) for f in fields(Limits)})
        values = {f.name: _env(f.name, f.default) for f in fields(cls) if f.name != "limits"}
        return cls(limits=limits, **values)

    def image_for(self, runtime: str) -> str:
        return self.python_image if runtime == "python" else self.cpp_image

    def pool_size(self, runtime: str) -> int:
        if not self.pool_enabled:
            return 0
        return self.pool_python if runtime == "python" else self.pool_cpp

    def pool_max(self, runtime: str, threads: int = 0) -> int:
        """Most warm containers one process keeps: explicit, else its task threads, else the min.

        ``threads`` is how many tasks this process runs at once under ``-P threads``
        (0 for prefork children and solo, which run one: their pools stay fixed).
        """
        explicit = self.pool_max_python if runtime == "python" else self.pool_max_cpp
        if not self.pool_enabled:
            return 0
        return max(self.pool_size(runtime), explicit if explicit > 0 else threads)

    def s3_credentials(self) -> dict[str, str]:
        """Explicit keys if set; "test" keys for a local emulator; else boto3's own chain."""
        if self.aws_access_key_id:
            return {
                "aws_access_key_id": self.aws_access_key_id,
                "aws_secret_access_key": self.aws_secret_access_key,
            }
        if self.s3_endpoint_url and not os.environ.get("AWS_ACCESS_KEY_ID"):
            return {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
        return {}

    @property
    def s3_endpoint(self) -> str | None:
        """None means "the real AWS endpoint for the region"."""
        return self.s3_endpoint_url or None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after patching env."""
    return Settings.from_env()
