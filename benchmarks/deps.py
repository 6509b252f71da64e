"""Functions with dependencies (issue 15): build time, and warm runs with vs without deps.

Run by ``python -m benchmarks.run`` after the agent mode (or alone with
``--deps only``). One agent-mode worker builds from a local PEP 503 index on
127.0.0.1 (tests/wheelhouse.py: no public index) into a fresh env root:

* **first run**: each of ``builds`` submissions names a requirements set never
  seen before (two small wheels, one a dependency of the other): ``deps_ms``
  is the build (pip download + offline install), ``latency`` the whole run;
* **warm**: the same submission shape (main.py + requirements.txt, zipped) with
  and without a requirement in it, interleaved one by one so drift hits both
  alike: ``import`` of the env's packages vs a plain ``print``. Goal:
  with/without p50 <= 1.5x.

Measured (2 cores, a qemu VM running alongside): build of a new two-wheel set
p50 902 ms; warm p50 with/without: client latency 33.0/32.2 ms (1.02x), worker
total 7.8/6.1 ms (1.28x), program 2.9/2.0 ms; a built env is found in 0.1 ms.

The section it writes into ``benchmarks/RESULTS.md`` sits between
``<!-- deps:start -->`` and ``<!-- deps:end -->`` (replaced on each run).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .stats import describe

START, END = "<!-- deps:start -->", "<!-- deps:end -->"
WITH = "import ngdemo, ngdep\nprint(ngdemo.__version__, ngdep.__version__)\n"
WITHOUT = "print('1.2.3', '0.4.0')\n"
GOAL = 1.5


def run(builds: int = 5, warm: int = 100, console: Any = None) -> dict[str, Any]:
    """Start an index and a worker, measure, stop both; returns the JSON-able summary."""
    from nanogrid_celery import client
    from tests.integration.harness import WorkerProcess
    from tests.wheelhouse import LocalIndex

    root = Path(tempfile.mkdtemp(prefix="nanogrid-bench-index-"))
    envs = Path(tempfile.mkdtemp(prefix="nanogrid-bench-envs-"))
    index = LocalIndex(root)
    index.add("ngdemo", "1.2.3", requires=("ngdep>=0.1",))
    index.add("ngdep", "0.4.0")
    for k in range(builds):
        index.add(f"ngbench{k}", "1.0", requires=("ngdep>=0.1",))
    index.start()
    worker = WorkerProcess(
        "bench-deps",
        concurrency=1,
        pool_python=1,
        pool_cpp=0,
        executor="agent",
        pip_index_url=index.url,
        deps_dir=str(envs),
    )
    worker.start(timeout=180)
    try:

        def go(files: dict[str, str]) -> tuple[float, Any]:
            t0 = time.perf_counter()
            result = client.run(files, "python", queue=worker.queue, wait_timeout=300)
            return (time.perf_counter() - t0) * 1000, result

        first_latency, first_build = [], []
        for k in range(builds):
            code = f"import ngbench{k}, ngdep\nprint(ngdep.__version__)\n"
            latency, result = go({"main.py": code, "requirements.txt": f"ngbench{k}\n"})
            assert result.status == "success", result
            first_latency.append(latency)
            first_build.append(result.deps_ms)
        with_deps = {"main.py": WITH, "requirements.txt": "ngdemo==1.2.3\n"}
        # the same submission shape (a zip of two files), but no requirement in it: the
        # difference is the environment alone, not the upload layout
        without = {"main.py": WITHOUT, "requirements.txt": "# no requirements\n"}
        for files in (with_deps, without):  # build + upload once, outside the samples
            go(files)
        samples: dict[str, dict[str, list[float]]] = {
            name: {"latency_ms": [], "total_ms": [], "duration_ms": [], "deps_ms": []}
            for name in ("with_deps", "without")
        }
        for _ in range(warm):
            for name, files in (("with_deps", with_deps), ("without", without)):
                latency, result = go(files)
                assert result.status == "success" and result.stdout == "1.2.3 0.4.0\n", result
                s = samples[name]
                s["latency_ms"].append(latency)
                s["total_ms"].append(result.total_ms or 0.0)
                s["duration_ms"].append(result.duration_ms or 0.0)
                if result.deps_ms is not None:
                    s["deps_ms"].append(result.deps_ms)
    finally:
        worker.stop()
        for container in worker.containers():
            container.remove(force=True)
        index.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(envs, ignore_errors=True)
    summary = {
        "first_run": {"latency_ms": describe(first_latency), "build_ms": describe(first_build)},
        "warm": {
            name: {metric: describe(v) for metric, v in s.items() if v}
            for name, s in samples.items()
        },
        "vm_running": _vm_running(),
    }
    w = summary["warm"]
    for metric in ("latency_ms", "total_ms", "duration_ms"):
        a, b = w["with_deps"][metric]["p50"], w["without"][metric]["p50"]
        summary.setdefault("ratios_p50", {})[metric] = round(a / b, 2) if a and b else None
    if console is not None:
        console.print(markdown(summary))
    return summary


def _vm_running() -> bool:
    return subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True).returncode == 0


def markdown(s: dict[str, Any]) -> str:
    first, warm, ratios = s["first_run"], s["warm"], s["ratios_p50"]
    lines = [
        START,
        "## Functions with dependencies (requirements.txt)",
        "",
        "`benchmarks/deps.py`: agent mode, one worker, a local PEP 503 index on 127.0.0.1 "
        "(two small wheels per set, one depending on the other).",
    ]
    if s.get("vm_running"):
        lines.append("")
        lines.append("**Note: a qemu VM was running on this machine during the measurement.**")
    lines += [
        "",
        "| first run with a new requirements set | p50 | p95 | max | runs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key in (("build (`deps_ms`)", "build_ms"), ("whole run (client)", "latency_ms")):
        d = first[key]
        lines.append(f"| {label} | {_f(d['p50'])} | {_f(d['p95'])} | {_f(d['max'])} | {d['n']} |")
    lines += [
        "",
        "| warm runs (ms) | latency p50 | latency p95 | worker total p50 | program p50 | runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("with_deps", "with deps (import 2 packages)"), ("without", "without")):
        d = warm[name]
        lines.append(
            f"| {label} | {_f(d['latency_ms']['p50'])} | {_f(d['latency_ms']['p95'])} | "
            f"{_f(d['total_ms']['p50'])} | {_f(d['duration_ms']['p50'])} | "
            f"{d['latency_ms']['n']} |"
        )
    ok = ratios["latency_ms"] is not None and ratios["latency_ms"] <= GOAL
    lines += [
        "",
        f"Ratios with/without p50: latency {ratios['latency_ms']}x (goal <= {GOAL}x: "
        f"{'met' if ok else 'NOT met'}), worker total {ratios['total_ms']}x, "
        f"program {ratios['duration_ms']}x. Getting a built environment (`deps_ms`) p50: "
        f"{warm['with_deps'].get('deps_ms', {}).get('p50')} ms.",
        END,
    ]
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write(summary: dict[str, Any], out_dir: Path, results_md: Path | None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "deps.json"
    path.write_text(json.dumps(summary, indent=1))
    written = [path]
    if results_md is not None:
        text = results_md.read_text() if results_md.exists() else ""
        section = markdown(summary)
        if START in text and END in text:
            head, rest = text.split(START, 1)
            text = head + section + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        results_md.write_text(text)
        written.append(results_md)
    return written
