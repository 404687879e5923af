"""Name the machine a benchmark ran on, for docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform

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
