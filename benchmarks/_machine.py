"""Name the machine a benchmark ran on, and append its section to docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch


def describe() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        model = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                model = next(
                    (
                        line.split(":", 1)[1].strip()
                        for line in handle
                        if line.startswith("model name")
                    ),
                    "",
                )
        except OSError:
            pass
        threads = torch.get_num_threads()
        name = model or platform.processor()
        device = f"CPU {name}, {os.cpu_count()} cores, {threads} torch threads"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def append_to_benchmarks(section: str) -> Path:
    """Append a section (its own heading first) to docs/BENCHMARKS.md; say where on stderr."""
    path = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
    path.parent.mkdir(exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(section)
    print(f"appended to {path}", file=sys.stderr)
    return path
