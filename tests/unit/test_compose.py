"""docker-compose.yml: valid, and consistent with the settings the worker and Flower read.

``docker compose config`` (or docker-compose v1) validates the file against the
Compose schema when a binary is installed; the checks below always run and pin
what the schema cannot know: our services, the Docker socket, Flower on 5555,
and that every NANOGRID_* variable is a real setting.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from nanogrid_celery.config import PREFIX, Limits, Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
SETTING_VARS = {PREFIX + f.name.upper() for f in (*fields(Settings), *fields(Limits))}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):  # the "KEY=value" form
        raw = dict(item.split("=", 1) for item in raw)
    return {k: str(v) for k, v in raw.items()}


def compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates():
    binary = compose_binary()
    if binary is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed; schema checks below")
    proc = subprocess.run(
        [*binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr


def test_the_whole_stack_is_there(services):
    assert {"moto", "redis", "python-image", "cpp-image", "worker", "flower"} <= set(services)
    for name in ("python-image", "cpp-image"):
        context = REPO / services[name]["build"]
        assert (context / "Dockerfile").is_file(), context
    assert (REPO / services["worker"]["build"] / "Dockerfile").is_file()


def test_worker_drives_the_hosts_docker(services):
    volumes = services["worker"]["volumes"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in volumes
    work_root = env(services["worker"])["NANOGRID_WORK_ROOT"]
    assert f"{work_root}:{work_root}" in volumes  # same path on both sides (host dockerd)


def test_every_nanogrid_variable_is_a_setting(services):
    for name, service in services.items():
        unknown = {k for k in env(service) if k.startswith(PREFIX)} - SETTING_VARS
        assert not unknown, f"{name}: {sorted(unknown)} are not fields of Settings/Limits"


def test_flower_reads_the_workers_events_on_5555(services):
    flower, worker = services["flower"], services["worker"]
    assert "127.0.0.1:5555:5555" in flower["ports"]
    command = flower["command"]
    assert command[:4] == ["celery", "-A", "nanogrid_celery", "flower"]  # the one app name
    assert "--port=5555" in command
    events = env(worker)["NANOGRID_EVENTS_BROKER_URL"]
    assert events.startswith("redis://redis:")
    assert env(flower)["NANOGRID_EVENTS_BROKER_URL"] == events


def test_metrics_endpoint_is_published(services):
    worker_env = env(services["worker"])
    port = int(worker_env["NANOGRID_METRICS_PORT"])
    assert port > 0
    assert worker_env["NANOGRID_METRICS_HOST"] == "0.0.0.0"  # reachable from outside
    # a host port range: dockerd gives each replica a free one (--scale worker=N, N <= 32)
    assert f"127.0.0.1:{port}-{port + 31}:{port}" in services["worker"]["ports"]


# -- issue 11: what is exposed -----------------------------------------------------------
def _published(port: Any) -> tuple[str, str]:
    """(host ip, host port) of a ``[ip:]host:container`` short-form port."""
    parts = str(port).split(":")
    assert len(parts) == 3, f"{port!r}: name the host address (127.0.0.1:host:container)"
    return parts[0], parts[1]


def test_every_published_port_is_bound_to_localhost(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            ip, host_port = _published(port)
            published[host_port.split("-")[0]] = name  # a range (scaled worker): its first
            assert ip == "127.0.0.1", f"{name} publishes {port!r} on every interface"
    assert {"5000", "6379", "5555", "9808"} <= set(published)  # moto, redis, flower, metrics


def test_flower_asks_for_auth(services):
    flower = env(services["flower"])
    auth = flower.get("FLOWER_BASIC_AUTH", "")
    assert auth.startswith("${FLOWER_BASIC_AUTH") and ":" in auth  # overridable from the env
    assert flower.get("FLOWER_UNAUTHENTICATED_API", "false").lower() != "true"
    assert not any("unauthenticated" in str(arg) for arg in services["flower"]["command"])


def test_worker_scales_to_n_replicas_without_collisions(services):
    """`docker compose up --scale worker=N`: nothing fixed per service, a label scope each."""
    worker = services["worker"]
    assert "container_name" not in worker  # compose numbers the replicas
    for published in worker.get("ports", []):
        host_port = str(published).split(":")[-2]
        assert "-" in host_port, f"a fixed host port {published} stops the 2nd replica"
    assert "NANOGRID_INSTANCE" not in env(worker)  # one value for all replicas would be shared
    script = worker["command"][-1]
    assert worker["command"][:2] == ["sh", "-c"]
    # per replica, from the container's hostname ($$ is compose's escape for $)
    assert 'NANOGRID_INSTANCE="compose-$$(hostname)"' in script
    assert '-n "worker@$$(hostname)"' in script
    assert script.split("exec ", 1)[1].startswith("celery -A nanogrid_celery worker")
    # the sandboxes' cgroups and /proc/<pid>/root are read directly (host's view of both)
    assert worker["pid"] == "host"
    assert "/sys/fs/cgroup:/sys/fs/cgroup" in worker["volumes"]
