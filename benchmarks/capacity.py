"""Capacity model inputs: CPU-ms per run of each component, memory per warm container.

    python -m benchmarks.capacity [--runs 600] [--clients 2] [--concurrency 2] [--results FILE]

One real ``celery worker -c N`` (prefork, default pools) on a *private* moto
(the SQS broker and S3) and a *private* redis-server (results, claims, events),
so their CPU is this run's alone. A burst of python hello runs from
``benchmarks/load.py`` (``--clients`` processes, back to back) is bracketed by
CPU snapshots of every component (see :mod:`benchmarks.procstat`):

* worker  - the worker's main process and its prefork children;
* moto    - broker + S3 stand-in; redis - redis-server;
* docker  - dockerd + containerd + every containerd-shim (shared with everyone
  on this machine: their rate over an idle window before the burst is
  subtracted);
* sandbox - inside the containers (agent, zygote, the program), by cgroup;
* clients - the load generator's processes (not part of a worker host).

It then reads the memory cgroup of every warm (paused) container, and times
the two ways of getting a container - create + start (+ agent ready), which
every pool shrink/grow pays, and unpause, which a warm hand-out pays. Recorded here
(2 cores, shared dockerd, ``-c 2``, 1000 runs, 2 clients, under another engineer's VM):
a worker host spends 21.6 CPU-ms per run (worker 13.1, sandboxes 5.7, Docker 2.9),
redis 1.0, moto 39; a paused python container holds 8.2 MiB; create+start 281 ms vs
unpause 11 ms. RESULTS.md "Capacity" has the run; docs/capacity.md the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import procstat
from .services import PrivateMoto, _free_port, _port_open

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = REPO / ".run" / "bench-logs"


class PrivateRedis:
    """A redis-server of our own: the shared one serves everybody's tests."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server") or "redis-server"
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 15
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on :{self.port}")
            time.sleep(0.05)
        url = f"redis://127.0.0.1:{self.port}"
        os.environ["NANOGRID_RESULT_BACKEND"] = f"{url}/0"
        os.environ["NANOGRID_REDIS_URL"] = f"{url}/0"
        os.environ["NANOGRID_EVENTS_BROKER_URL"] = f"{url}/1"
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def qemu_running() -> bool:
    return subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True).returncode == 0


class Components:
    """Which pids make up each component, resolved at snapshot time."""

    def __init__(self, worker_pid: int, moto_pid: int, redis_pid: int, instance: str) -> None:
        self.worker_pid, self.moto_pid, self.redis_pid = worker_pid, moto_pid, redis_pid
        self.instance = instance

    def pids(self) -> dict[str, list[int]]:
        return {
            "worker": procstat.tree(self.worker_pid),
            "moto": procstat.tree(self.moto_pid),
            "redis": procstat.tree(self.redis_pid),
            "dockerd": procstat.by_name("dockerd"),
            "containerd": [p for p in procstat.by_name("containerd") if "shim" not in _c(p)],
            "shims": procstat.by_name("containerd-shim"),
        }

    def containers(self) -> list[Any]:
        import docker

        return docker.from_env().containers.list(
            all=True, filters={"label": [f"nanogrid.instance={self.instance}"]}
        )

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {n: procstat.snapshot(p) for n, p in self.pids().items()}
        snap["sandbox"] = procstat.container_cpu_ms([c.id for c in self.containers()])
        snap["clients"] = _children_cpu_ms()
        snap["machine"] = procstat.machine_busy_ms()
        snap["t"] = time.monotonic()
        return snap


def _c(pid: int) -> str:
    return procstat.comm(pid)


def _children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def spent(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """CPU-ms per component between two snapshots."""
    out = {}
    for name in ("worker", "moto", "redis", "dockerd", "containerd", "shims"):
        out[name] = procstat.delta_ms(before[name], after[name])
    sandbox_before = before["sandbox"]
    out["sandbox"] = sum(ms - sandbox_before.get(c, 0.0) for c, ms in after["sandbox"].items())
    out["clients"] = after["clients"] - before["clients"]
    out["machine"] = after["machine"] - before["machine"]
    out["seconds"] = after["t"] - before["t"]
    return out


def container_memory(components: Components) -> dict[str, list[dict[str, int]]]:
    """Memory cgroup readings of every paused (warm) container, by runtime."""
    from nanogrid_celery.sandbox.cgroups import ContainerCgroup

    out: dict[str, list[dict[str, int]]] = {}
    for c in components.containers():
        if c.status != "paused":
            continue
        cg = ContainerCgroup(c.id)
        stat = _memory_stat(cg)
        out.setdefault(c.labels.get("nanogrid.runtime", "?"), []).append(
            {
                "usage": cg.usage_bytes(),
                "rss": stat.get("total_rss", stat.get("anon", 0)),
                "cache": stat.get("total_cache", stat.get("file", 0)),
            }
        )
    return out


def _memory_stat(cg: Any) -> dict[str, int]:
    text = (cg.memory / "memory.stat").read_text()
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def container_start_costs(samples: int = 8) -> dict[str, float]:
    """p50 ms of create+start+agent-ready+remove vs unpause/pause of one python container."""
    import docker

    from nanogrid_celery.config import get_settings
    from nanogrid_celery.sandbox.containers import create_container, destroy
    from nanogrid_celery.sandbox.executors import get_executor

    settings = get_settings()
    client = docker.from_env()
    executor = get_executor(settings.executor, settings, client)
    create, remove, unpause, pause = [], [], [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        lease = create_container(settings, client, executor, "python")
        create.append((time.perf_counter() - t0) * 1000)
        try:
            lease.container.reload()
            if lease.container.status == "paused":  # created ready-to-pool, i.e. paused
                lease.container.unpause()
            for _ in range(3):
                t0 = time.perf_counter()
                lease.container.pause()
                pause.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                lease.container.unpause()
                unpause.append((time.perf_counter() - t0) * 1000)
        finally:
            t0 = time.perf_counter()
            destroy(lease)
            remove.append((time.perf_counter() - t0) * 1000)
    return {
        "create_start_ms": round(statistics.median(create), 1),
        "remove_ms": round(statistics.median(remove), 1),
        "pause_ms": round(statistics.median(pause), 1),
        "unpause_ms": round(statistics.median(unpause), 1),
        "samples": samples,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    os.environ["NANOGRID_INSTANCE"] = f"capacity-{run_id}"
    os.environ["NANOGRID_QUEUE"] = f"nanogrid-capacity-{run_id}"
    for key, value in (("ACCESS_KEY_ID", "test"), ("SECRET_ACCESS_KEY", "test")):
        os.environ.setdefault(f"AWS_{key}", value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    contention = qemu_running()
    moto = PrivateMoto(LOG_DIR).start()
    redis = PrivateRedis().start()
    from tests.integration.harness import WorkerProcess

    from . import load

    worker = WorkerProcess("capacity", concurrency=args.concurrency)
    out: dict[str, Any] = {"runs": args.runs, "clients": args.clients}
    try:
        t0 = time.monotonic()
        worker.start(timeout=180)
        out["worker_start_s"] = round(time.monotonic() - t0, 1)  # ready + every pool full
        assert worker.proc is not None and moto.proc is not None and redis.proc is not None
        comps = Components(worker.proc.pid, moto.proc.pid, redis.proc.pid, worker.instance)
        load.run_burst(20, 1, worker.queue, timeout=120)  # warm-up: caches, connections
        time.sleep(2)
        idle0 = comps.snapshot()
        time.sleep(args.idle)
        idle = spent(idle0, comps.snapshot())
        before = comps.snapshot()
        report = load.run_burst(args.runs, args.clients, worker.queue, [worker.instance])
        burst = spent(before, comps.snapshot())
        worker.wait_pool_full(30)
        time.sleep(1.5)  # past the pause grace: every pooled container at rest
        out["memory"] = container_memory(comps)
        pids = comps.pids()
        out["rss_mib"] = {n: round(procstat.rss_mib(p), 1) for n, p in pids.items()}
        out["shim_count"] = len(pids["shims"])  # one per container on the machine (everyone's)
        out.update(
            ok=report.ok,
            duration_s=round(report.duration_s, 2),
            runs_per_s=report.runs_per_s,
            statuses=report.statuses,
            idle=idle,
            burst=burst,
        )
    finally:
        worker.stop()
        for c in worker.containers():
            c.remove(force=True)
    out["start_costs"] = container_start_costs()
    redis.stop()
    moto.stop()
    out["qemu_running"] = contention or qemu_running()
    out["recorded_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    out["nproc"] = os.cpu_count()
    out["concurrency"] = args.concurrency
    return out


def per_run(data: dict[str, Any]) -> dict[str, float]:
    """CPU-ms per run per component; shared docker daemons minus their idle rate."""
    runs, burst, idle = data["runs"], data["burst"], data["idle"]
    rows = {}
    for name in ("worker", "moto", "redis", "sandbox", "dockerd", "containerd", "shims", "clients"):
        ms = burst[name]
        if name in ("dockerd", "containerd", "shims"):
            ms -= idle[name] / idle["seconds"] * burst["seconds"]
        rows[name] = round(max(ms, 0.0) / runs, 2)
    return rows


def markdown(data: dict[str, Any]) -> str:
    rows = per_run(data)
    # a worker host runs the worker, its sandboxes and Docker; moto/Redis are central
    host_ms = sum(v for k, v in rows.items() if k not in ("clients", "moto", "redis"))
    busy_cores = data["burst"]["machine"] / 1000 / data["burst"]["seconds"]
    background = data["idle"]["machine"] / 1000 / data["idle"]["seconds"]
    mem = data["memory"].get("python", [])
    usage = statistics.median(m["usage"] for m in mem) / 2**20 if mem else 0.0
    rss = statistics.median(m["rss"] for m in mem) / 2**20 if mem else 0.0
    sc = data["start_costs"]
    lines = [
        f"## Capacity ({data['recorded_at']}, `python -m benchmarks.capacity`)",
        "",
        f"One `celery worker -c {data['concurrency']}` (prefork, default pools), private moto "
        f"and redis-server, {data['runs']} python hello runs from {data['clients']} client "
        f"processes; {data['nproc']} cores, load average after {data['load_average']}; "
        f"qemu VM running: {'yes (numbers under contention)' if data['qemu_running'] else 'no'}; "
        f"audit {'OK' if data['ok'] else 'FAILED'} {data['statuses']}.",
        "",
        f"Throughput: **{data['runs_per_s']} runs/s** ({data['runs']} runs in "
        f"{data['duration_s']} s); the machine was {busy_cores:.2f} of {data['nproc']} "
        f"cores busy (everyone's processes; {background:.2f} cores were busy in the idle "
        "window before the burst, i.e. other people's work).",
        "",
        "| component | CPU-ms per run |",
        "| --- | ---: |",
    ]
    labels = {
        "worker": "worker (main + prefork children)",
        "moto": "moto (SQS broker + S3)",
        "redis": "redis-server",
        "sandbox": "sandboxes (agent, zygote, program; cgroup)",
        "dockerd": "dockerd (minus idle rate)",
        "containerd": "containerd (minus idle rate)",
        "shims": "containerd-shims (minus idle rate)",
        "clients": "load-generator clients (not on a worker host)",
    }
    lines += [f"| {labels[k]} | {v} |" for k, v in rows.items()]
    lines += [
        f"| **worker host total (worker + sandboxes + docker)** | **{host_ms:.2f}** |",
        f"| with moto and redis-server | {host_ms + rows['moto'] + rows['redis']:.2f} |",
        "",
        f"Runs per core-second of a worker host: {1000 / host_ms:.1f} (1000 / host total); "
        f"measured {data['runs_per_s'] / busy_cores:.1f} runs/s per busy core.",
        "",
        f"Warm paused python container (memory cgroup, median of {len(mem)}): "
        f"usage {usage:.1f} MiB, rss {rss:.1f} MiB.",
        "Resident memory after the burst (VmRSS, MiB): "
        + ", ".join(f"{k} {v}" for k, v in data["rss_mib"].items())
        + f"; worker start to ready with full pools: {data['worker_start_s']} s.",
        f"Getting a container (p50 of {sc['samples']}): create + start + agent ready "
        f"{sc['create_start_ms']} ms, remove {sc['remove_ms']} ms; "
        f"unpause {sc['unpause_ms']} ms, pause {sc['pause_ms']} ms.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.capacity", description=__doc__)
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--idle", type=float, default=10, help="seconds of idle baseline")
    parser.add_argument("--json", help="write the raw measurements here")
    parser.add_argument("--results", help="append the markdown section to this file")
    args = parser.parse_args(argv)
    data = measure(args)
    text = markdown(data)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    if args.results:
        with open(args.results, "a") as fh:
            fh.write("\n" + text)
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
