"""The CPU's name for the machine record of every benchmark JSON (stdlib only: cheap to import anywhere)."""

import platform
from pathlib import Path


def cpu_model() -> str:
    """The `model name` of /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
