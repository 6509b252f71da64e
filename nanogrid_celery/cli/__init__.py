"""``nanogrid``: run code, build runtime images, clean up containers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanogrid_celery.config import get_settings


def _cmd_run(args: argparse.Namespace) -> int:
    from nanogrid_celery import client

    stdin = Path(args.stdin).read_text() if args.stdin else None
    cases = None
    if args.cases:
        doc = json.loads(Path(args.cases).read_text())
        cases = doc["cases"] if isinstance(doc, dict) and "cases" in doc else doc
    result = client.run(
        args.path,
        args.runtime,
        stdin=stdin,
        cases=cases,
        timeout_ms=args.timeout_ms,
        memory_mb=args.memory_mb,
        function=args.function,
        callback_url=args.callback_url,
        wait_timeout=args.wait,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.cases is not None:
        for i, case in enumerate(result.cases):
            verdict = case.get("verdict", "-")
            print(
                f"case {i}: [{case['status']}] {verdict} exit={case['exit_code']} "
                f"run={case['duration_ms']}ms"
                + (f" - {case['message']}" if case.get("message") else "")
            )
        print(
            f"[{result.status}] {result.message} compile_cached={result.compile_cached} "
            f"total={result.total_ms}ms",
            file=sys.stderr,
        )
    else:
        if result.stdout:
            sys.stdout.write(result.stdout)
            sys.stdout.flush()
        if result.stderr:
            sys.stderr.write(result.stderr)
        summary = (
            f"[{result.status}] exit={result.exit_code} run={result.duration_ms}ms "
            f"total={result.total_ms}ms start={result.start} container={result.container_id}"
        )
        if result.message:
            summary += f" - {result.message}"
        print(summary, file=sys.stderr)
    if result.cases:  # every case ran to success and every verdict given is accepted
        good = all(
            c["status"] == "success" and c.get("verdict", "accepted") == "accepted"
            for c in result.cases
        )
        return 0 if good else 1
    return 0 if result.ok else 1


def _cmd_upload(args: argparse.Namespace) -> int:
    from nanogrid_celery import client

    bucket, key = client.upload_code(args.path)
    kwargs = {"s3_bucket": bucket, "s3_key": key, "runtime": args.runtime}
    print(json.dumps({"kwargs": kwargs}))  # the body of Flower's async-apply of run_code
    return 0


def _cmd_images_build(args: argparse.Namespace) -> int:
    from nanogrid_celery.sandbox.images import ImageBuildError, build_images

    try:
        build_images(get_settings(), force=args.force, runtimes=args.runtime or None)
    except ImageBuildError as exc:
        print(f"image build failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    import docker

    from nanogrid_celery.sandbox.containers import remove_all

    removed = remove_all(docker.from_env(), None if args.all_instances else get_settings().instance)
    print(f"removed {removed} container(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanogrid", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="upload a file or folder, run it, print its output")
    run.add_argument("path")
    run.add_argument("--runtime", default="python", help="python | cpp (c++)")
    run.add_argument("--stdin", help="file whose content is the program's stdin")
    run.add_argument(
        "--cases",
        help='JSON file: [{"stdin", "expected_stdout", "timeout_ms", "memory_mb"}, ...] '
        '(or {"cases": [...]}): one compile, a verdict per case',
    )
    run.add_argument("--timeout-ms", type=int)
    run.add_argument("--memory-mb", type=int)
    run.add_argument("--function", help="name for the auto-tuner (default: hash of the code)")
    run.add_argument("--callback-url", help="the worker POSTs the signed result here too")
    run.add_argument("--wait", type=float, default=120, help="seconds to wait for the result")
    run.add_argument("--json", action="store_true", help="print the whole ExecutionResult")
    run.set_defaults(func=_cmd_run)

    upload = sub.add_parser(
        "upload", help="upload code, print run_code's kwargs (e.g. for Flower's task API)"
    )
    upload.add_argument("path")
    upload.add_argument("--runtime", default="python")
    upload.set_defaults(func=_cmd_upload)

    images = sub.add_parser("images", help="runtime images")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    build = images_sub.add_parser("build", help="build the runtime images offline")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.add_argument("--runtime", action="append", choices=["python", "cpp"])
    build.set_defaults(func=_cmd_images_build)

    cleanup = sub.add_parser("cleanup", help="remove NanoGrid containers (by label)")
    cleanup.add_argument("--all-instances", action="store_true")
    cleanup.set_defaults(func=_cmd_cleanup)

    from nanogrid_celery.cli.tune import add_commands  # watch, tune show|reset

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a CLI prints one clear line, not a traceback
        print(f"nanogrid {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
