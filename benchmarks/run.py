"""End-to-end latency and throughput: container per task vs warm ``docker exec`` vs the agent.

    python -m benchmarks.run [--quick] [--modes cold,exec,agent] [--out DIR] [--results FILE]
                             [--deps yes|no|only]

Every number goes through the real stack: the client uploads to S3 (moto),
enqueues on SQS (moto), a real ``celery worker`` (default concurrency) runs the
program in Docker, and the result comes back through Redis. The three modes run
in the same invocation, one worker each, so their ratios compare like with like:

* ``cold``  - no pool: a container is created (and removed) per task;
* ``exec``  - warm pool of paused containers: unpause, ``docker exec``, pause;
* ``agent`` - warm pool + the in-container agent (Python zygote), paused only
  after an idle grace period: the fast path.

Per scenario it records ``client.run`` wall time, the overhead (wall time minus
the program's own ``duration_ms``) and the worker-side overhead (``total_ms``
minus ``duration_ms``); then throughput at 1, 2 and 4 concurrent clients. It
writes JSON and a PNG chart to ``--out`` and (full runs) ``benchmarks/RESULTS.md``.
With the agent mode it then runs ``benchmarks/batch.py`` (build cache, test-case batches).
Last, the consumer matrix of :mod:`benchmarks.consume` (``--skip-consume`` leaves it out).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .stats import Sample, ScenarioResult, ThroughputResult
from .workloads import (
    CONCURRENCY,
    MODES,
    SCENARIOS,
    THROUGHPUT_RUNS,
    THROUGHPUT_SCENARIOS,
    Scenario,
)

REPO = Path(__file__).resolve().parents[1]
console = Console()


def _configure_environment() -> None:
    """Own instance label and queue, set before anything reads the settings."""
    run_id = uuid.uuid4().hex[:8]
    os.environ.setdefault("NANOGRID_INSTANCE", f"bench-{run_id}")
    os.environ.setdefault("NANOGRID_QUEUE", f"nanogrid-bench-{run_id}")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# -- one run ---------------------------------------------------------------------------------
class Submitter:
    """``client.run`` for fresh code; upload once + enqueue for content-addressed code."""

    def __init__(self, queue: str) -> None:
        from nanogrid_celery import client
        from nanogrid_celery.config import get_settings

        self.client, self.settings, self.queue = client, get_settings(), queue
        self._cached_keys: dict[tuple, tuple[str, str]] = {}

    def run(self, scenario: Scenario) -> tuple[float, Any]:
        if not scenario.cached:
            t0 = time.perf_counter()
            result = self.client.run(
                scenario.files, scenario.runtime, queue=self.queue, wait_timeout=300
            )
            return (time.perf_counter() - t0) * 1000, result
        bucket, key = self._cached_key(scenario)
        t0 = time.perf_counter()
        handle = self.client.enqueue(
            f"req-{uuid.uuid4().hex}", scenario.runtime, bucket, key, queue=self.queue
        )
        result = self.client.wait(handle, timeout=300)
        return (time.perf_counter() - t0) * 1000, result

    def _cached_key(self, scenario: Scenario) -> tuple[str, str]:
        from nanogrid_celery.execution.storage import content_addressed_key, upload

        ident = (scenario.runtime, tuple(sorted(scenario.files.items())))
        if ident not in self._cached_keys:
            ((name, source),) = scenario.files.items()  # single-file programs only
            data = source.encode()
            key = content_addressed_key(data, name, prefix="bench")
            bucket = self.client._bucket_ready(self.settings)
            upload(self.settings, key, data, bucket)
            self._cached_keys[ident] = (bucket, key)
        return self._cached_keys[ident]


def _sample(latency_ms: float, result: Any, scenario: Scenario) -> Sample:
    status = str(result.status)
    if status != scenario.status:
        status = f"{status} (expected {scenario.status}): {result.message[:80]}"
    elif scenario.expect and result.stdout != scenario.expect:
        status = f"wrong output: {result.stdout[:60]!r}"
    else:
        status = "ok"
    return Sample(
        latency_ms=latency_ms,
        duration_ms=result.duration_ms,
        total_ms=result.total_ms,
        queue_ms=result.queue_ms,
        start=result.start,
        container=result.container_id,
        status=status,
    )


def run_scenario(
    submitter: Submitter, mode: str, scenario: Scenario, samples: int, advance
) -> ScenarioResult:
    out = ScenarioResult(mode, scenario.name)
    for _ in range(2):  # warm-up: first compile, first S3 client, first container touch
        submitter.run(scenario)
    for _ in range(samples):
        try:
            latency, result = submitter.run(scenario)
            out.samples.append(_sample(latency, result, scenario))
        except Exception as exc:  # a failed run is counted, not fatal
            out.errors.append(f"{type(exc).__name__}: {exc}")
        advance()
    return out


# -- throughput: concurrent clients in separate processes ------------------------------------
def _client_process(tasks: mp.Queue, results: mp.Queue) -> None:
    """A long-lived client: for each task, warm up, wait for the common start, run n times."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _configure_environment()
    submitter: Submitter | None = None
    while True:
        task = tasks.get()
        if task is None:
            return
        queue, scenario, runs, start_at = task
        if submitter is None or submitter.queue != queue:
            submitter = Submitter(queue)
        submitter.run(scenario)
        time.sleep(max(0.0, start_at - time.time()))
        begin = time.time()
        latencies, queue_ms, failures = [], [], 0
        for _ in range(runs):
            try:
                latency, result = submitter.run(scenario)
                latencies.append(latency)
                if result.queue_ms is not None:
                    queue_ms.append(result.queue_ms)
                failures += str(result.status) != "success"
            except Exception:
                failures += 1
        results.put((begin, time.time(), latencies, failures, queue_ms))


class ClientPool:
    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")  # no Celery/boto connections shared with this process
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [
            ctx.Process(target=_client_process, args=(self.tasks, self.results), daemon=True)
            for _ in range(size)
        ]
        for proc in self.procs:
            proc.start()

    def throughput(
        self, mode: str, queue: str, scenario: Scenario, concurrency: int, total: int
    ) -> ThroughputResult:
        each = max(1, total // concurrency)
        start_at = time.time() + 3.0  # spawned clients import and warm up meanwhile
        for _ in range(concurrency):
            self.tasks.put((queue, scenario, each, start_at))
        parts = [self.results.get(timeout=900) for _ in range(concurrency)]
        begin = min(p[0] for p in parts)
        end = max(p[1] for p in parts)
        latencies = [lat for p in parts for lat in p[2]]
        failures = sum(p[3] for p in parts)
        queue_ms = [q for p in parts for q in p[4]]
        runs = each * concurrency
        return ThroughputResult(
            mode, scenario.name, concurrency, runs, end - begin, latencies, failures, queue_ms
        )

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# -- the whole benchmark ---------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1/4 of the samples (a smoke run)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument(
        "--shared-moto",
        action="store_true",
        help="use the configured SQS/S3 endpoints instead of a private moto server",
    )
    parser.add_argument(
        "--skip-consume",
        action="store_true",
        help="leave out the consumer matrix (benchmarks/consume.py, issue 17)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="markdown summary to write (default: benchmarks/RESULTS.md for full runs of all "
        "modes, none for --quick or subsets)",
    )
    parser.add_argument(
        "--deps",
        choices=("yes", "no", "only"),
        default="yes",
        help="requirements.txt benchmark (benchmarks/deps.py) after the agent mode, or only it",
    )
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    results_md = args.results
    if results_md is None and not args.quick and (modes == list(MODES) or args.deps == "only"):
        results_md = REPO / "benchmarks" / "RESULTS.md"

    moto = None
    if not args.shared_moto:  # before anything reads the settings
        from .services import PrivateMoto

        moto = PrivateMoto(REPO / ".run" / "bench-logs").start()
    try:
        rc = 0 if args.deps == "only" else _run(args, modes, results_md)
        if args.deps == "only" or (args.deps == "yes" and "agent" in modes):
            _run_deps(args, results_md)
        return rc
    finally:
        if moto is not None:
            moto.stop()


def _run(args: argparse.Namespace, modes: list[str], results_md: Path | None) -> int:
    _configure_environment()
    from tests.integration.harness import WorkerProcess

    from . import report

    factor = 0.25 if args.quick else 1.0
    scenarios = [s.scaled(factor) for s in SCENARIOS]
    plan = _plan(modes, scenarios, factor)
    machine = report.machine_info()
    machine["services"] = (
        "shared moto (SQS+S3)" if args.shared_moto else "private moto (SQS+S3) for this run"
    ) + ", shared Redis"
    console.print(report.machine_line(machine))
    clients = ClientPool(max(CONCURRENCY))
    scenario_results: list[ScenarioResult] = []
    throughput: list[ThroughputResult] = []
    consume_data: dict[str, Any] | None = None
    started = time.time()
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("starting", total=sum(plan.values()))
            for mode in modes:
                progress.update(task, description=f"{mode}: starting worker")
                worker = WorkerProcess(
                    f"bench-{mode}", concurrency=os.cpu_count() or 1, **MODES[mode]
                )
                worker.start(timeout=180)
                try:
                    submitter = Submitter(worker.queue)
                    for scenario in scenarios:
                        progress.update(task, description=f"{mode}: {scenario.name}")
                        n = scenario.cold_samples if mode == "cold" else scenario.samples
                        scenario_results.append(
                            run_scenario(
                                submitter, mode, scenario, n, lambda: progress.advance(task)
                            )
                        )
                    for scenario in (s for s in scenarios if s.name in THROUGHPUT_SCENARIOS):
                        for concurrency in CONCURRENCY:
                            progress.update(
                                task, description=f"{mode}: {scenario.name} x{concurrency} clients"
                            )
                            total = _throughput_runs(mode, factor)
                            throughput.append(
                                clients.throughput(mode, worker.queue, scenario, concurrency, total)
                            )
                            progress.advance(task, total)
                finally:
                    progress.update(task, description=f"{mode}: stopping worker")
                    worker.stop()
                    left = worker.containers()
                    for container in left:
                        with suppress(Exception):
                            container.remove(force=True)
                    if left:
                        console.print(f"[red]{mode}: worker left {len(left)} containers")
        if not args.skip_consume:
            from . import consume

            console.print("consumer matrix (benchmarks/consume.py)")
            consume_data = consume.run(clients, args.quick, lambda text: console.print(text))
    finally:
        clients.close()
    data = report.build(
        machine, modes, scenario_results, throughput, started, time.time(), quick=args.quick
    )
    if consume_data is not None:
        data["consume"] = consume_data
    report.print_summary(console, data)
    paths = report.write(data, args.out, results_md)
    for path in paths:
        console.print(f"wrote {path}")
    if "agent" in modes:  # issue 16: build cache and test-case batches, own worker
        from . import batch

        batch.run(args.quick, results_md)
    return 0


def _run_deps(args: argparse.Namespace, results_md: Path | None) -> None:
    _configure_environment()
    from . import deps

    console.print("deps: first runs with new requirements sets, then warm with vs without")
    factor = 0.25 if args.quick else 1.0
    summary = deps.run(builds=max(2, int(5 * factor)), warm=max(10, int(100 * factor)))
    console.print(deps.markdown(summary))
    for path in deps.write(summary, args.out, results_md):
        console.print(f"wrote {path}")


def _throughput_runs(mode: str, factor: float) -> int:
    base = THROUGHPUT_RUNS["cold" if mode == "cold" else "warm"]
    return max(max(CONCURRENCY), int(base * factor))


def _plan(modes: list[str], scenarios: list[Scenario], factor: float) -> dict[str, int]:
    plan = {}
    for mode in modes:
        runs = sum(s.cold_samples if mode == "cold" else s.samples for s in scenarios)
        levels = len(CONCURRENCY) * len(THROUGHPUT_SCENARIOS)
        plan[mode] = runs + levels * _throughput_runs(mode, factor)
    return plan


if __name__ == "__main__":
    sys.exit(main())
