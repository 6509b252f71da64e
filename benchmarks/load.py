"""Load generator: a burst of runs from several client processes, then a full audit.

    python -m benchmarks.load --runs 2000 --clients 4 [--queue Q] [--instance I]

Every client process enqueues its share of the burst as fast as it can (the
code is uploaded to S3 once; ``--upload-each`` uploads per request, as real
clients do). Then the audit waits for every request id and checks that:

* each id has exactly one result, and it is that id's (no missing, no mixups);
* each id was *executed* exactly once (the idempotency start counter is 1:
  no duplicate runs from redelivery);
* no container is left leased (running) once the burst is done.

It prints the burst's size, duration, throughput and result count, and exits
non-zero if any check fails. :func:`run_burst` is what the integration test calls.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

CODE = "print(sum(range(1000)))"
EXPECTED_STDOUT = "499500\n"


@dataclass
class LoadReport:
    runs: int
    clients: int
    queue: str
    submit_s: float = 0.0
    duration_s: float = 0.0
    results: int = 0
    missing: int = 0
    wrong_id: int = 0
    duplicate_runs: int = 0
    not_started: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    wrong_output: int = 0
    leased_containers: int = 0
    containers: int = 0

    @property
    def runs_per_s(self) -> float:
        return round(self.runs / self.duration_s, 1) if self.duration_s else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.results == self.runs
            and not (self.missing or self.wrong_id or self.duplicate_runs or self.not_started)
            and not self.leased_containers
        )

    def summary(self) -> str:
        return (
            f"burst: {self.runs} runs from {self.clients} client processes -> queue {self.queue}\n"
            f"  submitted in {self.submit_s:.2f} s; all results in {self.duration_s:.2f} s "
            f"({self.runs_per_s} runs/s)\n"
            f"  results: {self.results}/{self.runs}, missing {self.missing}, "
            f"wrong id {self.wrong_id}, executed twice {self.duplicate_runs}, "
            f"never executed {self.not_started}\n"
            f"  statuses: {self.statuses}; unexpected output: {self.wrong_output}\n"
            f"  containers: {self.containers} left, {self.leased_containers} still leased\n"
            f"  verdict: {'OK' if self.ok else 'FAILED'}"
        )


def _client_process(ids: list[str], bucket: str, key: str, queue: str, upload_each: bool) -> float:
    """One client: enqueue ``ids``; returns seconds spent. Imports here: own connections."""
    from nanogrid_celery import client

    t0 = time.perf_counter()
    for request_id in ids:
        if upload_each:
            bucket, key = client.upload_code({"main.py": CODE}, request_id)
        client.enqueue(request_id, "python", bucket, key, queue=queue)
    return time.perf_counter() - t0


def submit_burst(
    runs: int, clients: int, queue: str, upload_each: bool = False
) -> tuple[list[str], float]:
    """Enqueue ``runs`` requests from ``clients`` processes; returns (ids, seconds)."""
    from nanogrid_celery import client

    burst = uuid.uuid4().hex[:8]
    ids = [f"load-{burst}-{i:06d}" for i in range(runs)]
    bucket, key = client.upload_code({"main.py": CODE}, f"load-{burst}")
    shares = [ids[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(clients) as pool:
        pool.starmap(_client_process, [(s, bucket, key, queue, upload_each) for s in shares])
    return ids, time.perf_counter() - t0


def collect(ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until every id has a stored result (or ``timeout``); returns {id: result dict}."""
    from nanogrid_celery.app import app

    backend = app.backend
    found: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        still = []
        for i in range(0, len(pending), 500):
            chunk = pending[i : i + 500]
            raws = backend.client.mget([backend.get_key_for_task(rid) for rid in chunk])
            for rid, raw in zip(chunk, raws, strict=True):
                meta = backend.decode_result(raw) if raw else None
                if meta and meta.get("status") == "SUCCESS":
                    found[rid] = meta["result"]
                else:
                    still.append(rid)
        pending = still
        if pending:
            time.sleep(0.25)
    return found


def audit(
    report: LoadReport, ids: list[str], found: dict[str, dict[str, Any]], instances: list[str]
) -> LoadReport:
    import redis

    from nanogrid_celery.config import get_settings
    from nanogrid_celery.delivery.idempotency import STARTS

    report.results = len(found)
    report.missing = len(ids) - len(found)
    report.wrong_id = sum(1 for rid, r in found.items() if r.get("request_id") != rid)
    report.statuses = dict(Counter(str(r.get("status")) for r in found.values()))
    report.wrong_output = sum(1 for r in found.values() if r.get("stdout") != EXPECTED_STDOUT)
    r = redis.Redis.from_url(get_settings().redis_url)
    counts: list[Any] = []
    for i in range(0, len(ids), 500):
        counts += r.mget([STARTS.format(rid) for rid in ids[i : i + 500]])
    starts = [int(c or 0) for c in counts]
    report.duplicate_runs = sum(1 for s in starts if s > 1)
    report.not_started = sum(1 for s in starts if s == 0)
    if instances:
        report.containers, report.leased_containers = count_containers(instances)
    return report


def count_containers(instances: list[str]) -> tuple[int, int]:
    """(containers, of which leased) for these instance labels; pooled ones rest paused."""
    import docker

    client = docker.from_env()
    total = leased = 0
    for instance in instances:
        found = client.containers.list(
            all=True, filters={"label": [f"nanogrid.instance={instance}"]}, ignore_removed=True
        )
        total += len(found)
        leased += sum(1 for c in found if c.status != "paused")
    return total, leased


def run_burst(
    runs: int,
    clients: int,
    queue: str,
    instances: list[str] | None = None,
    timeout: float = 600,
    upload_each: bool = False,
) -> LoadReport:
    """Submit, wait, audit; see the module doc."""
    report = LoadReport(runs=runs, clients=clients, queue=queue)
    t0 = time.perf_counter()
    ids, report.submit_s = submit_burst(runs, clients, queue, upload_each)
    found = collect(ids, timeout)
    report.duration_s = time.perf_counter() - t0
    time.sleep(1.0)  # let the last runs hand their containers back to the pool
    return audit(report, ids, found, instances or [])


def main(argv: list[str] | None = None) -> int:
    from nanogrid_celery.config import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--queue", default=settings.queue)
    parser.add_argument(
        "--instance",
        action="append",
        help="instance label(s) of the workers, for the container check (default: settings)",
    )
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--upload-each", action="store_true", help="one S3 upload per request")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    report = run_burst(
        args.runs,
        args.clients,
        args.queue,
        instances=args.instance or [settings.instance],
        timeout=args.timeout,
        upload_each=args.upload_each,
    )
    print(report.summary())
    if args.json:
        data = asdict(report) | {"runs_per_s": report.runs_per_s, "ok": report.ok}
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=2)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
