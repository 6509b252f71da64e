"""Demand-sized pools on a ``-P threads -c 16`` worker (issue 14), recorded in results/scaling.md.

    python -m benchmarks.scaling [--bursts 3] [--burst 48] [--threads 16] [--ttl 20]

Three bursts of 48 one-second programs on one threads worker: cold starts per
burst (goal: at most 2 after the first), then idle for the pool TTL (goal:
back to the minimum), then python hello world p50 on the same worker against
a prefork worker's in the same run (goal: within 1.2x). Private moto, shared
Redis and Docker, as ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .report import machine_info, machine_line
from .run import REPO, _configure_environment
from .stats import describe

SLEEP = {"main.py": "import time\ntime.sleep(1)\nprint('done')\n"}
HELLO = {"main.py": "print('hello')\n"}
OUT = REPO / "benchmarks" / "results" / "scaling.md"


def _burst(client, queue: str, n: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    handles = [client.submit(SLEEP, "python", queue=queue) for _ in range(n)]
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda h: client.wait(h, timeout=300), handles))
    return time.perf_counter() - t0, results


def _hello_p50(client, queue: str, n: int) -> dict:
    client.run(HELLO, "python", queue=queue)  # upload + warm up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = client.run(HELLO, "python", queue=queue)
        times.append((time.perf_counter() - t0) * 1000)
        assert result.status == "success", result.message
    return describe(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--burst", type=int, default=48)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--ttl", type=float, default=20.0)
    parser.add_argument("--hello", type=int, default=60)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    _configure_environment()
    from .services import PrivateMoto

    moto = PrivateMoto(REPO / ".run").start()  # first: the client's app reads the broker URL
    from nanogrid_celery import client
    from tests.integration.harness import WorkerProcess

    data: dict = {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}}
    print(machine_line(data["machine"]))
    threaded = WorkerProcess(
        "bench-threads", concurrency=args.threads, pool="threads", pool_idle_ttl_s=args.ttl
    )
    prefork = WorkerProcess("bench-prefork", concurrency=os.cpu_count() or 1)
    try:
        threaded.start(timeout=180)
        minimum = threaded.pool_target
        bursts = []
        for i in range(args.bursts):
            wall, results = _burst(client, threaded.queue, args.burst)
            cold = sum(r.start == "cold" for r in results)
            ok = sum(r.status == "success" for r in results)
            bursts.append({"burst": i + 1, "wall_s": round(wall, 2), "cold": cold, "ok": ok})
            print(f"burst {i + 1}: {wall:.2f} s, {cold} cold starts, {ok}/{args.burst} ok")
        peak = len(threaded.containers())
        t0 = time.monotonic()
        while len(threaded.containers()) > minimum and time.monotonic() - t0 < args.ttl * 4:
            time.sleep(0.5)
        decay = {
            "containers_after_bursts": peak,
            "containers_after_idle": len(threaded.containers()),
            "minimum": minimum,
            "seconds_to_minimum": round(time.monotonic() - t0, 1),
        }
        print(
            f"idle: {peak} -> {decay['containers_after_idle']} in {decay['seconds_to_minimum']} s"
        )
        hello_threads = _hello_p50(client, threaded.queue, args.hello)
        threaded.stop()
        prefork.start(timeout=180)
        hello_prefork = _hello_p50(client, prefork.queue, args.hello)
    finally:
        for w in (threaded, prefork):
            w.stop()
            for c in w.containers():
                c.remove(force=True)
        moto.stop()
    ratio = hello_threads["p50"] / hello_prefork["p50"]
    data |= {
        "bursts": bursts,
        "decay": decay,
        "hello_threads_ms": hello_threads,
        "hello_prefork_ms": hello_prefork,
        "hello_ratio": round(ratio, 3),
        "goals": {
            "cold_after_first<=2": all(b["cold"] <= 2 for b in bursts[1:]),
            "back_to_minimum": decay["containers_after_idle"] <= minimum,
            "hello_within_1.2x": ratio <= 1.2,
        },
    }
    print(f"python hello p50: threads {hello_threads['p50']} ms, prefork {hello_prefork['p50']} ms")
    print(f"ratio {ratio:.2f}x; goals: {data['goals']}")
    _write(args.out, data)
    return 0


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(
        f"| {b['burst']} | {b['wall_s']} | {b['cold']} | {b['ok']} |" for b in data["bursts"]
    )
    a, d = data["args"], data["decay"]
    t, p = data["hello_threads_ms"], data["hello_prefork_ms"]
    path.write_text(
        f"""# Demand-sized pools (`python -m benchmarks.scaling`)

- when: {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
- machine: {machine_line(data["machine"])}
- worker: `celery -A nanogrid_celery worker -P threads -c {a["threads"]}`, pool minimum
  {d["minimum"]} python, idle TTL {a["ttl"]} s; bursts of {a["burst"]} one-second programs

| burst | wall s | cold starts | ok |
|---:|---:|---:|---:|
{rows}

Idle: {d["containers_after_bursts"]} containers after the bursts, {d["containers_after_idle"]}
after {d["seconds_to_minimum"]} s (minimum {d["minimum"]}).

python hello world, {a["hello"]} sequential runs, end to end (ms):

| worker | p50 | p95 | max |
|---|---:|---:|---:|
| `-P threads -c {a["threads"]}` | {t["p50"]} | {t["p95"]} | {t["max"]} |
| prefork (default concurrency) | {p["p50"]} | {p["p95"]} | {p["max"]} |

Ratio threads/prefork p50: **{data["hello_ratio"]}x**. Goals: {data["goals"]}

```json
{json.dumps(data, indent=1)}
```
"""
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
