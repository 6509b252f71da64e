"""Benchmark output: the machine, console tables, JSON, a PNG chart and RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .stats import ScenarioResult, ThroughputResult
from .workloads import MODE_HELP, THROUGHPUT_SCENARIOS

TARGET_EXEC_RATIO = 4.0
TARGET_COLD_RATIO = 10.0
TARGET_WORKER_OVERHEAD_MS = 5.0
TARGET_RUNS_PER_SECOND = 50.0


# -- the machine -----------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        docker = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        docker = "unknown"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "docker": docker,
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['nproc']} x {m['cpu']}, {m['memory_gb']} GB, kernel {m['kernel']}, "
        f"Docker {m['docker']}, Python {m['python']}, load {m['load_average_at_start']}"
    )


# -- the result document ---------------------------------------------------------------------
def build(
    machine: dict[str, Any],
    modes: list[str],
    scenarios: list[ScenarioResult],
    throughput: list[ThroughputResult],
    started: float,
    finished: float,
    quick: bool,
) -> dict[str, Any]:
    machine = {**machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    summary: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, Any]] = {}
    for res in scenarios:
        summary.setdefault(res.scenario, {})[res.mode] = res.summary()
        raw.setdefault(res.scenario, {})[res.mode] = {
            "latency_ms": [round(s.latency_ms, 3) for s in res.samples],
            "worker_overhead_ms": [
                None if s.worker_overhead_ms is None else round(s.worker_overhead_ms, 3)
                for s in res.samples
            ],
            "duration_ms": [s.duration_ms for s in res.samples],
            "errors": res.errors[:20],
        }
    data = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": round(finished - started, 1),
        "quick": quick,
        "machine": machine,
        "modes": {m: MODE_HELP[m] for m in modes},
        "scenarios": summary,
        "throughput": [t.as_dict() for t in throughput],
        "ratios": _ratios(summary, modes),
        "raw": raw,
    }
    data["targets"] = _targets(data)
    return data


def _p50(summary: dict, scenario: str, mode: str, metric: str = "latency_ms") -> float | None:
    return summary.get(scenario, {}).get(mode, {}).get(metric, {}).get("p50")


def _ratios(summary: dict, modes: list[str]) -> dict[str, dict[str, float | None]]:
    """How many times slower than the agent each other mode is, at p50 and p95."""
    out: dict[str, dict[str, float | None]] = {}
    for scenario, by_mode in summary.items():
        agent = by_mode.get("agent")
        if not agent:
            continue
        for other in (m for m in modes if m != "agent" and m in by_mode):
            for pct in ("p50", "p95"):
                a, o = agent["latency_ms"][pct], by_mode[other]["latency_ms"][pct]
                value = round(o / a, 2) if a and o else None
                out.setdefault(scenario, {})[f"{other}/agent {pct}"] = value
    return out


def _targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    s, r = data["scenarios"], data["ratios"].get("python-hello", {})

    def best(scenario: str) -> float | None:
        rates = [
            t["runs_per_second"]
            for t in data["throughput"]
            if t["mode"] == "agent" and t["scenario"] == scenario
        ]
        return max(rates, default=None)

    rows = [
        ("python hello p50: exec / agent", r.get("exec/agent p50"), TARGET_EXEC_RATIO, ">="),
        ("python hello p50: cold / agent", r.get("cold/agent p50"), TARGET_COLD_RATIO, ">="),
        (
            "worker-side overhead p50 (client.run), ms",
            _p50(s, "python-hello", "agent", "worker_overhead_ms"),
            TARGET_WORKER_OVERHEAD_MS,
            "<",
        ),
        (
            "worker-side overhead p50 (cached code), ms",
            _p50(s, "python-hello-cached", "agent", "worker_overhead_ms"),
            TARGET_WORKER_OVERHEAD_MS,
            "<",
        ),
        (
            "python hello runs/s, client.run (best of 1/2/4 clients)",
            best("python-hello"),
            TARGET_RUNS_PER_SECOND,
            ">=",
        ),
        (
            "python hello runs/s, cached code (best of 1/2/4 clients)",
            best("python-hello-cached"),
            TARGET_RUNS_PER_SECOND,
            ">=",
        ),
    ]
    out = []
    for name, value, target, op in rows:
        met = None if value is None else (value >= target if op == ">=" else value < target)
        out.append({"target": name, "value": value, "goal": f"{op} {target:g}", "met": met})
    return out


# -- console ---------------------------------------------------------------------------------
def print_summary(console: Console, data: dict[str, Any]) -> None:
    for scenario, by_mode in data["scenarios"].items():
        table = Table(title=f"{scenario}: client.run latency and overhead (ms)")
        for col in ("mode", "p50", "p95", "p99", "overhead p50", "worker p50", "program p50", "n"):
            table.add_column(col, justify="right")
        for mode, summ in by_mode.items():
            lat = summ["latency_ms"]
            table.add_row(
                mode,
                _fmt(lat["p50"]),
                _fmt(lat["p95"]),
                _fmt(lat["p99"]),
                _fmt(summ["overhead_ms"]["p50"]),
                _fmt(summ["worker_overhead_ms"]["p50"]),
                _fmt(summ["duration_ms"]["p50"]),
                f"{lat['n']}" + (f" ({summ['failures']} failed)" if summ["failures"] else ""),
            )
        console.print(table)
    for scenario in THROUGHPUT_SCENARIOS:
        table = Table(title=f"throughput, {scenario} (runs/s)")
        for col in ("mode", "1 client", "2 clients", "4 clients"):
            table.add_column(col, justify="right")
        for mode in data["modes"]:
            cells = _tput_cells(data, mode, scenario)
            table.add_row(mode, *(_tput_cell(cells.get(c)) for c in (1, 2, 4)))
        console.print(table)
    for scenario, ratios in data["ratios"].items():
        console.print(f"{scenario}: " + ", ".join(f"{k} = {v}x" for k, v in ratios.items()))
    for t in data["targets"]:
        mark = {True: "[green]met", False: "[red]missed", None: "[yellow]n/a"}[t["met"]]
        console.print(f"target {t['target']}: {_fmt(t['value'])} (goal {t['goal']}) {mark}")
    if data.get("consume"):
        from . import consume

        consume.print_tables(console, data["consume"])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _tput_cells(data: dict[str, Any], mode: str, scenario: str) -> dict[int, dict]:
    return {
        t["concurrency"]: t
        for t in data["throughput"]
        if t["mode"] == mode and t["scenario"] == scenario
    }


def _tput_cell(t: dict | None) -> str:
    if not t:
        return "-"
    return f"{t['runs_per_second']:.1f}" + (f" ({t['failures']} failed)" if t["failures"] else "")


# -- files -----------------------------------------------------------------------------------
def write(data: dict[str, Any], out_dir: Path, results_md: Path | None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for name in (f"bench-{stamp}.json", "latest.json"):
        path = out_dir / name
        path.write_text(json.dumps(data, indent=1))
        paths.append(path)
    chart = out_dir / "latency.png"
    plot(data, chart)
    paths.append(chart)
    if results_md is not None:
        results_md.write_text(markdown(data, chart))
        paths.append(results_md)
    return paths


def plot(data: dict[str, Any], path: Path) -> None:
    """Latency CDF per scenario (one line per mode, log scale) and throughput bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scenarios = list(data["raw"])
    colors = {"cold": "#d62728", "exec": "#ff7f0e", "agent": "#2ca02c"}
    fig, axes = plt.subplots(2, 4, figsize=(21, 9))
    flat = axes.flatten()
    for ax, scenario in zip(flat, scenarios, strict=False):
        for mode, raw in data["raw"][scenario].items():
            values = sorted(raw["latency_ms"])
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, ys, where="post", label=mode, color=colors.get(mode))
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 3, 5)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_title(f"{scenario}: client.run latency")
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction of runs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    spare = list(flat[len(scenarios) :])
    for ax, scenario in zip(spare, THROUGHPUT_SCENARIOS, strict=False):
        modes = list(data["modes"])
        width = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            cells = _tput_cells(data, mode, scenario)
            rows = [cells[c] for c in sorted(cells)]
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, [t["runs_per_second"] for t in rows], width, label=mode, color=colors[mode])
        ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(3)], ["1", "2", "4"])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("runs / s")
        ax.set_title(f"throughput: {scenario}")
        ax.legend()
    for extra in spare[len(THROUGHPUT_SCENARIOS) :]:
        extra.axis("off")
    fig.suptitle(f"NanoGrid end-to-end, {machine_line(data['machine'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _floor_notes(data: dict[str, Any]) -> list[str]:
    """What the infrastructure alone costs, and so the best ratio any executor could reach."""
    s = data["scenarios"]
    floor = _p50(s, "floor", "agent") or _p50(s, "floor", "exec")
    exec_, agent = _p50(s, "python-hello", "exec"), _p50(s, "python-hello", "agent")
    if not (floor and exec_ and agent):
        return []
    return [
        "",
        f"Reading the numbers: `floor` (upload + SQS + Redis, no work) is {floor:.1f} ms at p50,",
        f"so python hello spends {agent - floor:.1f} ms above it on the fast path (worker,",
        f"program) and {exec_ - floor:.1f} ms with `docker exec`. An executor that cost",
        f"nothing would reach exec/agent = {exec_ / floor:.1f}x: on moto, SQS and S3 dominate.",
    ]


def markdown(data: dict[str, Any], chart: Path) -> str:
    m = data["machine"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m benchmarks.run`); every number is end to end through",
        "the real stack: client -> S3 (moto) -> SQS (moto) -> `celery worker` (default",
        "concurrency) -> Docker -> Redis -> client. Latency is `client.run` wall time; the",
        "client uploads code under its `sha256-` key and skips an upload it made minutes ago,",
        "and the worker caches such keys (`python-hello-cached`: enqueue to result, upload done",
        "beforehand). Overhead = latency - the program's own `duration_ms`; worker-side",
        "overhead = the worker's `total_ms` - `duration_ms` (task received to result ready).",
        "`floor` is a request the worker rejects before touching S3 or Docker: what S3 upload,",
        "SQS and Redis cost by themselves, under every other row.",
        "",
        f"- when: {data['when']} ({data['seconds']} s{', --quick' if data['quick'] else ''})",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gb']} GB, kernel {m['kernel']}, "
        f"Docker {m['docker']}, Python {m['python']}",
        f"- services: {m.get('services', '?')}",
        f"- load average at start / end: {m['load_average_at_start']} / "
        f"{m['load_average_at_end']} (the machine is shared: expect noise)",
        "",
        "Modes:",
        "",
    ]
    lines += [f"- `{mode}`: {text}" for mode, text in data["modes"].items()]
    lines += ["", "## Targets", "", "| target | value | goal | met |", "| --- | ---: | --- | --- |"]
    for t in data["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {t['goal']} | {met} |")
    lines += _floor_notes(data)
    lines += ["", "## Latency (ms)", ""]
    for scenario, by_mode in data["scenarios"].items():
        lines += [
            f"### {scenario}",
            "",
            "| mode | p50 | p95 | p99 | overhead p50 | worker overhead p50 | program p50 | runs |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for mode, s in by_mode.items():
            lat = s["latency_ms"]
            lines.append(
                f"| {mode} | {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | "
                f"{_fmt(s['overhead_ms']['p50'])} | {_fmt(s['worker_overhead_ms']['p50'])} | "
                f"{_fmt(s['duration_ms']['p50'])} | {lat['n']} |"
            )
        ratios = data["ratios"].get(scenario)
        if ratios:
            lines += ["", "Ratios: " + ", ".join(f"{k} = {v}x" for k, v in ratios.items())]
        lines.append("")
    lines += [
        "## Throughput (runs/s, concurrent clients submitting back to back)",
        "",
        "| scenario | mode | 1 client | 2 clients | 4 clients |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for scenario in THROUGHPUT_SCENARIOS:
        for mode in data["modes"]:
            cells = _tput_cells(data, mode, scenario)
            row = " | ".join(_tput_cell(cells.get(c)) for c in (1, 2, 4))
            lines.append(f"| {scenario} | {mode} | {row} |")
    lines += [
        "",
        f"![latency distributions](out/{chart.name}) (written to `benchmarks/out/`, not committed)",
        "",
    ]
    if data.get("consume"):
        from . import consume

        lines += consume.markdown_lines(data["consume"])
    return "\n".join(lines)
