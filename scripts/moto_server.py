"""moto's server for the local stack, without two per-request costs that are moto's, not ours.

    python scripts/moto_server.py -H 127.0.0.1 -p 5000   # moto_server's own arguments

moto stands in for SQS and S3 on the same 2 cores as the worker, so what it burns per
request is taken from the runs being measured. Profiled (py-spy, GIL samples, 10 s)
under a ``-c 1`` worker serving two clients at 31 runs/s, moto was the busiest process
on the host (56% of a core), and 28% of its time went to two things no one reads:

* the access line werkzeug writes for every request (13.7%), which always says
  ``"POST / HTTP/1.1" 200`` (the body names the action, the line does not); errors are
  still logged;
* ``moto.backends.list_of_moto_modules``, which lists and stats every entry of moto's
  package directory on each request to match the Host header (14.5%); the directory
  does not change while the server runs, so it is read once.

Everything else is ``moto.server.main`` unchanged (recording, ports, arguments). If a
moto release renames the function, the server still starts, only without that saving.
"""

from __future__ import annotations

import functools
import logging
import sys


def _memoize_module_list() -> None:
    from moto import backends

    listing = getattr(backends, "list_of_moto_modules", None)
    if listing is None:
        return
    once = functools.cache(lambda: tuple(listing()))
    backends.list_of_moto_modules = once  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    _memoize_module_list()
    from moto.server import main as moto_main

    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
