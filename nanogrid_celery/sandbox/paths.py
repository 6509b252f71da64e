"""Where things are inside a sandbox container, and the environment a program gets.

The only host paths a container sees are its own lease directory, read-only
at ``/sandbox`` (``code/`` and ``stdin``), and for the agent executor its
private control directory at ``/run/nanogrid`` (host mode 0700: uid 65534 can
neither see nor connect to it).
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
