"""What the benchmark runs: the programs, the modes and how many samples of each."""

from __future__ import annotations

from dataclasses import dataclass

HELLO_CPP = '#include <iostream>\nint main() { std::cout << "hello cpp" << std::endl; }\n'
CPU_PY = "total = 0\nfor i in range(1_500_000):\n    total += i * i % 7\nprint(total)\n"


@dataclass(frozen=True)
class Scenario:
    """One program, submitted either fresh each time or once under a content-addressed key."""

    name: str
    runtime: str
    files: dict[str, str]
    expect: str  # the stdout every run must print
    samples: int  # sequential runs measured (warm modes)
    cold_samples: int  # sequential runs measured in cold mode (each creates a container)
    cached: bool = False  # upload once to a sha256-named key, then only enqueue
    status: str = "success"  # the status every run must end with

    def scaled(self, factor: float) -> Scenario:
        return Scenario(
            self.name,
            self.runtime,
            self.files,
            self.expect,
            max(5, int(self.samples * factor)),
            max(4, int(self.cold_samples * factor)),
            self.cached,
            self.status,
        )


SCENARIOS = (
    # the infrastructure alone: S3 upload, SQS, Redis; the worker rejects the unknown runtime
    # before any S3 read or container, so this is the floor under every other scenario
    Scenario("floor", "cobol", {"main.py": "print('hello')"}, "", 30, 10, status="rejected"),
    Scenario("python-hello", "python", {"main.py": "print('hello')"}, "hello\n", 100, 30),
    Scenario(
        "python-hello-cached",
        "python",
        {"main.py": "print('hello')"},
        "hello\n",
        100,
        20,
        cached=True,
    ),
    Scenario("cpp-hello", "cpp", {"main.cpp": HELLO_CPP}, "hello cpp\n", 20, 10),
    Scenario("python-cpu", "python", {"main.py": CPU_PY}, "", 20, 10),
)

THROUGHPUT_SCENARIOS = ("python-hello", "python-hello-cached")
CONCURRENCY = (1, 2, 4)
THROUGHPUT_RUNS = {"warm": 80, "cold": 24}  # runs per concurrency level

# mode -> worker settings (NANOGRID_*); every mode uses the default worker concurrency
MODES: dict[str, dict[str, str]] = {
    "cold": {"pool_enabled": "false", "executor": "exec"},
    "exec": {"pool_enabled": "true", "executor": "exec"},
    "agent": {"pool_enabled": "true", "executor": "agent"},
}
MODE_HELP = {
    "cold": "a new container per task (no pool), docker exec",
    "exec": "warm pool of paused containers, unpause + docker exec + pause",
    "agent": "warm pool + in-container agent (python zygote), pause after an idle grace",
}
