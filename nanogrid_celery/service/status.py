"""Pool figures of every worker process, for ``celery inspect stats``.

Prefork runs the pools in child processes, but ``inspect stats`` is answered
by the main process; so each process that owns a pool writes a small JSON
snapshot (atomic rename) every :data:`INTERVAL_S` under
``<work_root>/<instance>/status/<pid>.json``, and the main process's
bootstep adds up the files of live processes. A snapshot costs one ~1 KiB
write; nothing here touches a run's path.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from nanogrid_celery.common.identity import ProcessIdentity
from nanogrid_celery.common.logs import get_logger
from nanogrid_celery.config import Settings

log = get_logger(__name__)
INTERVAL_S = 2.0


def status_dir(settings: Settings) -> Path:
    return Path(settings.work_root) / settings.instance / "status"


def write_snapshot(settings: Settings, pool: Any) -> None:
    me = ProcessIdentity.current()
    path = status_dir(settings)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {"pid": me.pid, "ppid": os.getppid(), "start": me.start, "pools": pool.stats()}
    tmp = path / f".{me.pid}.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path / f"{me.pid}.json")


def start_publisher(settings: Settings, pool: Any) -> threading.Thread:
    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(INTERVAL_S):
            try:
                write_snapshot(settings, pool)
            except OSError as exc:
                log.debug("could not write the pool status: %s", exc)

    try:
        write_snapshot(settings, pool)
    except OSError as exc:
        log.debug("could not write the pool status: %s", exc)
    thread = threading.Thread(target=loop, name="pool-status", daemon=True)
    thread.start()
    return thread


def collect(settings: Settings) -> dict[str, dict[str, int]]:
    """Per runtime, the sum over this worker's live processes (it and its children)."""
    me = os.getpid()
    total: dict[str, dict[str, int]] = {}
    for path in sorted(status_dir(settings).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        who = ProcessIdentity("", int(data.get("pid", 0)), str(data.get("start", "")))
        if not who.alive():
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        if me not in (who.pid, data.get("ppid")):
            continue  # another worker's process sharing this instance label
        for rt, figures in data.get("pools", {}).items():
            acc = total.setdefault(rt, {})
            for key, value in figures.items():
                acc[key] = acc.get(key, 0) + int(value)
    return total
