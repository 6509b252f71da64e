"""Issue 17: does a freed worker slot take the next message at once, at every concurrency?

    python -m benchmarks.consume [--quick] [--shared-moto]

(``python -m benchmarks.run``, i.e. ``make bench``, runs it too, after the modes.)

A matrix of workers - ``-c 1`` and ``-c 2`` (prefork) and ``-P threads -c 8`` -
each started three times in the same run: ``before`` with kombu's own poll loop
(``NANOGRID_SQS_PROMPT_RECEIVE=false``, ``NANOGRID_EVENTS_FLUSH_MS=0``: what the code
did before issue 17),
``prompt`` with the prompt receive alone (nanogrid_celery/delivery/prompt_receive.py,
``NANOGRID_SQS_LOOK_AHEAD_HOLD_MS=0``) and ``after`` with the look-ahead too (the
default; nanogrid_celery/delivery/look_ahead.py). Each serves python hello from 1,
2 and 4 clients submitting back to back (``client.run``); per cell: runs/s,
client latency p50 and ``queue_ms`` (SQS send -> task start) p50/p95; per worker,
the look-ahead messages it had to give back (from its log).

Then the idle cost: the same six workers, idle together for a minute on a
private moto that records every request (tests/integration/faults.py), and
the ReceiveMessage calls each worker's queue got (``before`` and ``after``): long
polling must stay one call per ``wait_time_seconds`` (20 s: 3 a minute).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .stats import ThroughputResult

REPO = Path(__file__).resolve().parents[1]

# label -> (celery pool, concurrency)
CONFIGS: dict[str, tuple[str, int]] = {
    "-c 1": ("prefork", 1),
    "-c 2": ("prefork", 2),
    "-P threads -c 8": ("threads", 8),
}
# variant -> the worker settings it changes (absent = the default). ``before`` also sends
# task events on the next loop pass as Celery does (events_flush_ms=0): the held events'
# flush timer wakes kombu's hub, which alone took the old loop from 2.4 to 25 runs/s at
# -c 1 in the 09:07 recording, so without it ``before`` was no longer the code of before.
VARIANTS: dict[str, dict[str, str]] = {
    "before": {
        "sqs_prompt_receive": "false",
        "sqs_look_ahead_hold_ms": "0",
        "events_flush_ms": "0",
    },
    "prompt": {"sqs_prompt_receive": "true", "sqs_look_ahead_hold_ms": "0"},
    "after": {"sqs_prompt_receive": "true"},
}
IDLE_VARIANTS = ("before", "after")
CLIENTS = (1, 2, 4)
RUNS = 60  # per cell
IDLE_SECONDS = 60.0

TARGET_C1_RUNS_PER_SECOND = 40.0
TARGET_C1_SHARE_OF_SERIAL = 0.7  # of 1 / (single-client latency)
TARGET_C1_QUEUE_P50_MS = 20.0
TARGET_C2_NOT_SLOWER = 0.9  # after / before runs/s, worst client count (the machine is shared)


def _name(what: str, pool: str, concurrency: int, variant: str) -> str:
    """Short: the name goes into the instance label and so into the agent's socket path."""
    return f"{what}-{pool[0]}{concurrency}{variant[0]}"


def _worker_env(pool: str, concurrency: int, variant: str) -> dict[str, str | int]:
    # one warm python container per run that can be in flight at once (no cpp: not used)
    per_process = min(concurrency, max(CLIENTS)) if pool == "threads" else 1
    return {"pool_python": per_process, "pool_cpp": 0, **VARIANTS[variant]}


def run_matrix(clients: Any, quick: bool, progress: Any = None) -> list[dict[str, Any]]:
    """Every config x variant x client count; ``clients`` is run.py's ClientPool."""
    from tests.integration.harness import WorkerProcess

    from .run import Submitter
    from .workloads import SCENARIOS

    scenario = next(s for s in SCENARIOS if s.name == "python-hello")
    runs = 16 if quick else RUNS
    cells: list[dict[str, Any]] = []
    for label, (pool, concurrency) in CONFIGS.items():
        for variant in VARIANTS:
            if progress:
                progress(f"consume {label} {variant}")
            worker = WorkerProcess(
                _name("mx", pool, concurrency, variant),
                concurrency=concurrency,
                pool=pool,
                **_worker_env(pool, concurrency, variant),
            )
            worker.start(timeout=180)
            try:
                warm = Submitter(worker.queue)  # threads/solo build their runner on first use
                for _ in range(3):
                    warm.run(scenario)
                for n in CLIENTS:
                    given_back = _given_back(worker)
                    result: ThroughputResult = clients.throughput(
                        f"{label} {variant}", worker.queue, scenario, n, runs
                    )
                    cells.append(
                        {
                            "config": label,
                            "variant": variant,
                            **result.as_dict(),
                            "given_back": _given_back(worker) - given_back,
                        }
                    )
            finally:
                worker.stop()
                for container in worker.containers():
                    with suppress(Exception):
                        container.remove(force=True)
    return cells


def _given_back(worker: Any) -> int:
    """Look-ahead messages the worker gave back so far (nanogrid_celery/delivery/look_ahead.py)."""
    try:
        from nanogrid_celery.delivery.look_ahead import GIVEN_BACK

        return worker.log_path.read_text(errors="replace").count(GIVEN_BACK)
    except OSError:
        return 0


def run_idle(seconds: float) -> dict[str, dict[str, float]]:
    """ReceiveMessage calls per idle minute, per config and variant, all idle at once."""
    from tests.integration.faults import IsolatedClient, MotoServer
    from tests.integration.harness import WorkerProcess

    moto = MotoServer(record=True).start()
    workers: dict[tuple[str, str], Any] = {}
    client = IsolatedClient(broker_url=moto.broker_url, s3_endpoint_url=moto.endpoint)
    try:
        for label, (pool, concurrency) in CONFIGS.items():
            for variant in IDLE_VARIANTS:
                workers[(label, variant)] = WorkerProcess(
                    _name("idle", pool, concurrency, variant),
                    concurrency=concurrency,
                    pool=pool,
                    broker_url=moto.broker_url,
                    s3_endpoint_url=moto.endpoint,
                    **_worker_env(pool, concurrency, variant),
                )
        for worker in workers.values():
            worker.start(timeout=180)
        for worker in workers.values():  # some work first: acks free slots, then nothing
            for _ in range(2):
                client.wait(client.submit({"main.py": "print('hello')"}, worker.queue), 120)
        time.sleep(1.0)  # let the last receive after the last ack start
        before = {k: moto.sqs_calls("ReceiveMessage", w.queue) for k, w in workers.items()}
        time.sleep(seconds)
        counts = {
            k: moto.sqs_calls("ReceiveMessage", w.queue) - before[k] for k, w in workers.items()
        }
    finally:
        client.close()
        for worker in workers.values():
            worker.stop()
        moto.stop()
    out: dict[str, dict[str, float]] = {}
    for (label, variant), count in counts.items():
        out.setdefault(label, {})[variant] = round(count * 60.0 / seconds, 1)
    return out


def run(clients: Any, quick: bool, progress: Any = None) -> dict[str, Any]:
    started = time.time()
    cells = run_matrix(clients, quick, progress)
    if progress:
        progress("consume: idle workers")
    idle_s = 20.0 if quick else IDLE_SECONDS
    idle = run_idle(idle_s)
    data = {"cells": cells, "idle_receives_per_minute": idle, "idle_seconds": idle_s}
    data["targets"] = targets(data)
    data["seconds"] = round(time.time() - started, 1)
    return data


# -- targets ---------------------------------------------------------------------------------
def _cell(data: dict[str, Any], config: str, variant: str, n: int) -> dict[str, Any] | None:
    for cell in data["cells"]:
        if (cell["config"], cell["variant"], cell["concurrency"]) == (config, variant, n):
            return cell
    return None


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[tuple[str, float | None, str, bool | None]] = []
    after = [_cell(data, "-c 1", "after", n) for n in CLIENTS]
    if all(after):
        single_ms = after[0]["latency_ms"]["p50"]
        serial = 1000.0 / single_ms if single_ms else None
        worst = min(c["runs_per_second"] for c in after[1:])
        rows.append(
            (
                "`-c 1`, 2 and 4 clients: runs/s (worst)",
                worst,
                f">= {TARGET_C1_RUNS_PER_SECOND:g}",
                worst >= TARGET_C1_RUNS_PER_SECOND,
            )
        )
        if serial:
            share = round(worst / serial, 2)
            rows.append(
                (
                    f"`-c 1`: that / (1 / single-client latency {single_ms:.1f} ms)",
                    share,
                    f">= {TARGET_C1_SHARE_OF_SERIAL:g}",
                    share >= TARGET_C1_SHARE_OF_SERIAL,
                )
            )
        q50 = after[1]["queue_ms"]["p50"]
        rows.append(
            (
                "`-c 1`, 2 clients: queue_ms p50, ms",
                q50,
                f"<= {TARGET_C1_QUEUE_P50_MS:g}",
                None if q50 is None else q50 <= TARGET_C1_QUEUE_P50_MS,
            )
        )
        # with 4 clients and one slot a message waits behind up to 3 others: queueing,
        # (n - 1) x the slot's time per run, not an idle gap; shown against that bound
        per_run_ms = 1000.0 / after[2]["runs_per_second"] if after[2]["runs_per_second"] else 0
        q50_4 = after[2]["queue_ms"]["p50"]
        rows.append(
            (
                "`-c 1`, 4 clients: queue_ms p50, ms (3 runs ahead in line)",
                q50_4,
                f"<= 3 x {per_run_ms:.1f} ms per run",
                None if q50_4 is None else q50_4 <= 3 * per_run_ms,
            )
        )
    prompt_2 = _cell(data, "-c 1", "prompt", 2)
    if all(after) and prompt_2 and prompt_2["queue_ms"]["p50"]:
        ratio = round(after[1]["queue_ms"]["p50"] / prompt_2["queue_ms"]["p50"], 2)
        rows.append(
            ("`-c 1`, 2 clients: queue_ms p50, look-ahead / prompt alone", ratio, "< 1", ratio < 1)
        )
    ratios = []
    for n in CLIENTS:
        a, b = _cell(data, "-c 2", "after", n), _cell(data, "-c 2", "before", n)
        if a and b and b["runs_per_second"]:
            ratios.append(a["runs_per_second"] / b["runs_per_second"])
    if ratios:
        worst_ratio = round(min(ratios), 2)
        rows.append(
            (
                "`-c 2`: runs/s after / before (worst of 1/2/4 clients)",
                worst_ratio,
                f">= {TARGET_C2_NOT_SLOWER:g}",
                worst_ratio >= TARGET_C2_NOT_SLOWER,
            )
        )
    given_back = sum(c.get("given_back", 0) for c in data["cells"])
    runs = sum(c.get("runs", 0) for c in data["cells"] if c["variant"] == "after")
    rows.append(
        (
            f"look-ahead messages given back, all `after` cells ({runs} runs)",
            given_back,
            "report",
            None,
        )
    )
    idle = data.get("idle_receives_per_minute") or {}
    if idle:
        excess = max(v.get("after", 0) - v.get("before", 0) for v in idle.values())
        rows.append(
            (
                "idle ReceiveMessage calls/min: after - before (worst config)",
                round(excess, 1),
                "<= 0",
                excess <= 0,
            )
        )
    return [{"target": t, "value": v, "goal": g, "met": m} for t, v, g, m in rows]


# -- output ----------------------------------------------------------------------------------
def _f(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def _cell_text(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "-"
    q = cell["queue_ms"]
    failed = f", {cell['failures']} failed" if cell["failures"] else ""
    if cell.get("given_back"):
        failed += f", {cell['given_back']} given back"
    return (
        f"{cell['runs_per_second']:.1f}/s, lat {_f(cell['latency_ms']['p50'])}, "
        f"q {_f(q['p50'])} / {_f(q['p95'])}{failed}"
    )


def markdown_lines(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Consumer: a freed slot takes the next message at once (issue 17)",
        "",
        "`python -m benchmarks.consume`: python hello, clients submitting back to back; each",
        "worker three times in this run, `before` = kombu's own poll loop",
        "(`NANOGRID_SQS_PROMPT_RECEIVE=false`, task events sent on the next loop pass:",
        "`NANOGRID_EVENTS_FLUSH_MS=0`), `prompt` = the prompt receive alone",
        "(`NANOGRID_SQS_LOOK_AHEAD_HOLD_MS=0`), `after` = with the look-ahead (the default).",
        "A cell is runs/s, client latency p50 (ms), queue_ms (SQS send -> task start)",
        "p50 / p95 (ms).",
        "",
        "| target | value | goal | met |",
        "| --- | ---: | --- | --- |",
    ]
    for t in data["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_f(t['value'])} | {t['goal']} | {met} |")
    lines += [
        "",
        "| worker | variant | 1 client | 2 clients | 4 clients |",
        "| --- | --- | --- | --- | --- |",
    ]
    for config in CONFIGS:
        for variant in VARIANTS:
            cells = " | ".join(_cell_text(_cell(data, config, variant, n)) for n in CLIENTS)
            lines.append(f"| `{config}` | {variant} | {cells} |")
    idle = data.get("idle_receives_per_minute") or {}
    if idle:
        lines += [
            "",
            f"Idle: ReceiveMessage calls per minute on each worker's queue (all six idle at once "
            f"for {data['idle_seconds']:g} s after two runs each, long poll 20 s), counted by a "
            "private moto that records every request:",
            "",
            "| worker | before | after |",
            "| --- | ---: | ---: |",
        ]
        for config, by_variant in idle.items():
            lines.append(
                f"| `{config}` | {_f(by_variant.get('before'))} | {_f(by_variant.get('after'))} |"
            )
    lines.append("")
    return lines


def print_tables(console: Console, data: dict[str, Any]) -> None:
    table = Table(title="consumer matrix: runs/s, latency p50, queue_ms p50 / p95 (ms)")
    for col in ("worker", "variant", *(f"{n} client{'s' * (n > 1)}" for n in CLIENTS)):
        table.add_column(col)
    for config in CONFIGS:
        for variant in VARIANTS:
            table.add_row(
                config, variant, *(_cell_text(_cell(data, config, variant, n)) for n in CLIENTS)
            )
    console.print(table)
    for config, by_variant in (data.get("idle_receives_per_minute") or {}).items():
        console.print(f"idle ReceiveMessage/min {config}: {by_variant}")
    for t in data["targets"]:
        mark = {True: "[green]met", False: "[red]missed", None: "[yellow]n/a"}[t["met"]]
        console.print(f"target {t['target']}: {_f(t['value'])} (goal {t['goal']}) {mark}")


def main(argv: list[str] | None = None) -> int:
    """Only this part of the benchmark: prints the tables and writes out/consume-latest.json."""
    import json

    from . import run as bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shared-moto", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="markdown file whose consumer section to replace (e.g. benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    moto = None
    if not args.shared_moto:
        from .services import PrivateMoto

        moto = PrivateMoto(REPO / ".run" / "bench-logs").start()
    bench._configure_environment()
    clients = bench.ClientPool(max(CLIENTS))
    console = Console()
    from .report import machine_info

    machine = machine_info()
    try:
        data = run(clients, args.quick, lambda text: console.print(text))
    finally:
        clients.close()
        if moto is not None:
            moto.stop()
    data["when"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    data["load_average"] = [machine["load_average_at_start"], list(os.getloadavg())]
    print_tables(console, data)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "consume-latest.json"
    path.write_text(json.dumps(data, indent=1))
    console.print(f"wrote {path}")
    if args.results is not None:
        replace_section(args.results, data)
        console.print(f"updated {args.results}")
    return 0


def replace_section(results_md: Path, data: dict[str, Any]) -> None:
    """Put this run's consumer section into ``results_md`` (a run of this module alone)."""
    text = results_md.read_text() if results_md.exists() else ""
    head = "## Consumer:"
    start = text.find(head)
    if start < 0:
        before, after = text.rstrip() + "\n\n", ""
    else:
        before = text[:start]
        nxt = text.find("\n## ", start + len(head))
        after = "" if nxt < 0 else text[nxt + 1 :]
    lines = markdown_lines(data)
    start_load, end_load = data.get("load_average", [None, None])
    lines[1:1] = [
        "",
        f"Recorded by `python -m benchmarks.consume --results` at {data.get('when')} "
        f"({data['seconds']} s; load average {start_load} -> "
        f"{[round(x, 2) for x in end_load or []]}).",
    ]
    results_md.write_text(before + "\n".join(lines) + ("\n" + after if after else ""))


if __name__ == "__main__":
    sys.exit(main())
