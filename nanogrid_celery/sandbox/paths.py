"""Where things are inside a sandbox container, and the environment a program gets.

``/sandbox`` is the container's own tmpfs: ``code/`` is the run's writable
working directory (a copy of its code, owned by the sandbox user) and
``stdin`` its input (root's, read-only); both are staged from the host and
wiped with the run. The only host path a container sees is, for the agent
executor, its private control directory at ``/run/nanogrid`` (host mode 0700:
uid 65534 can neither see nor connect to it).
"""

SANDBOX_DIR = "/sandbox"
CODE_DIR = "/sandbox/code"
STDIN_PATH = "/sandbox/stdin"
CTL_DIR = "/run/nanogrid"

ENV = {
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
}
