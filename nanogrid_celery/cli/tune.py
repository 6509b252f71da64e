"""``nanogrid watch`` and ``nanogrid tune show|reset``: the tuner and result events from a shell.

Kept out of cli.py so that file stays a table of commands. ``tune show``
computes recommendations with this process's NANOGRID_TUNER_* settings, which
in a deployment are the workers' settings too.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from nanogrid_celery.config import get_settings

MB = 1024 * 1024


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def _when(ts: float | None, ms: bool = True) -> str:
    if not ts:
        return "-"
    text = time.strftime("%H:%M:%S", time.localtime(ts))
    return text + f".{int(ts % 1 * 1000):03d}" if ms else text


# -- watch -----------------------------------------------------------------------
def format_event(ev: dict[str, Any]) -> str:
    """One line per run: time, request id, function, status, duration, peak memory, limit."""
    dur = ev.get("duration_ms")
    limit = ev.get("memory_limit_bytes")
    tuned = " tuned" if ev.get("memory_tuned") else ""
    return (
        f"{_when(ev.get('finished_at'))}  {ev.get('request_id', '-')}  "
        f"{ev.get('function') or '-'}  {ev.get('status', '-'):<13}  "
        f"{'-' if dur is None else f'{dur:.0f}ms':>8}  peak={_mb(ev.get('peak_memory_bytes'))}MiB  "
        f"limit={_mb(limit)}MiB{tuned}  attempts={ev.get('attempts', 1)}"
    )


def cmd_watch(args: argparse.Namespace) -> int:
    from nanogrid_celery.cli.watch import cmd_watch as watch  # follows the stream, reconnects

    return watch(args, format_event)


# -- tune ------------------------------------------------------------------------
def _tuner():
    from nanogrid_celery.common.redis import get_redis
    from nanogrid_celery.middleware.tuning import TunerPolicy, TunerStore

    settings = get_settings()
    store = TunerStore.from_settings(settings, get_redis(settings.redis_url))
    return store, TunerPolicy.from_settings(settings)


def cmd_tune_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from nanogrid_celery.middleware.tuning import stats_for

    store, policy = _tuner()
    names = [args.function] if args.function else store.functions(args.limit)
    histories = {name: store.history(name) for name in names}
    stats = [stats_for(name, histories[name], policy) for name in names if histories[name]]
    if args.json:
        print(json.dumps([s.to_dict() for s in stats], indent=2))
        return 0 if stats or not args.function else 1
    console = Console(width=args.width) if args.width else Console()
    if not args.width and not console.is_terminal:
        console.width = max(console.width, 120)  # piped: do not squeeze the columns
    if not stats:
        console.print(f"no tuner history for {args.function}" if args.function else "no history")
        return 1 if args.function else 0
    title = f"auto-tuner, memory in MiB (min runs {policy.min_runs}, headroom {policy.headroom})"
    table = Table(title=title)
    table.add_column("function", no_wrap=True)
    for col in ("runs", "ooms", "p95 peak", "recommended", "current"):
        table.add_column(col, justify="right")
    table.add_column("tuned")
    table.add_column("code", no_wrap=True)  # the recommendation is for this code only
    table.add_column("last run", no_wrap=True)
    for s in stats:
        rec = "-" if s.recommended_bytes is None else str(s.recommended_bytes // MB)
        table.add_row(
            s.function,
            str(s.runs),
            str(s.ooms),
            _mb(s.p95_peak_bytes),
            rec,
            "-" if s.current_limit_bytes is None else str(s.current_limit_bytes // MB),
            "yes" if s.current_tuned else "no",
            (s.code or "-")[:12] + (f" (+{s.codes - 1} other)" if s.codes > 1 else ""),
            _when(s.last_run, ms=False),
        )
    console.print(table)
    if args.function:
        runs = Table(title=f"history of {args.function} (newest first)")
        for col in ("time", "status", "peak MiB", "limit MiB", "tuned"):
            runs.add_column(col)
        for r in histories[args.function]:
            runs.add_row(_when(r.ts), r.status, _mb(r.peak_bytes), _mb(r.limit_bytes), str(r.tuned))
        console.print(runs)
    return 0


def cmd_tune_reset(args: argparse.Namespace) -> int:
    store, _policy = _tuner()
    existed = store.reset(args.function)
    print(f"{'reset' if existed else 'no history for'} {args.function}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``watch`` and ``tune`` on the main parser's subcommands."""
    from nanogrid_celery.cli.watch import add_arguments

    watch = sub.add_parser("watch", help="tail the results stream live, one line per run")
    add_arguments(watch)
    watch.set_defaults(func=cmd_watch)

    tune = sub.add_parser("tune", help="auto-tuner history and recommendations")
    tune_sub = tune.add_subparsers(dest="tune_command", required=True)
    show = tune_sub.add_parser("show", help="runs, p95 peak, recommendation, current limit")
    show.add_argument("function", nargs="?")
    show.add_argument("--limit", type=int, default=50, help="most recent N functions")
    show.add_argument("--json", action="store_true")
    show.add_argument("--width", type=int, default=0, help="table width (default: terminal)")
    show.set_defaults(func=cmd_tune_show)
    reset = tune_sub.add_parser("reset", help="forget a function's history")
    reset.add_argument("function")
    reset.set_defaults(func=cmd_tune_reset)
