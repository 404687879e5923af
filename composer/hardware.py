"""What this machine computes well: the dtype that ``auto`` means on a CPU.

bfloat16 halves the memory of frozen models, but only CPUs with native bf16 dot products run its
matmuls fast: measured on the 2-core AVX2-only CI kind, (300x1536 @ 1536x8960, one thread)
took 0.57 s in float32 and 75 s in bfloat16; on an AMD EPYC with AVX512-BF16, 0.19 s against
0.086 s. So ``auto`` is bfloat16 only where the CPU says it has bf16 instructions (Linux's
/proc/cpuinfo flags), and where flags cannot be read, only when a small timed matmul agrees.
The answer is decided once per process.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection
from pathlib import Path

logger = logging.getLogger(__name__)

# x86: AVX512-BF16 (Cooper Lake, Zen 4+) and AMX-BF16 (Sapphire Rapids+); Arm: FEAT_BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
PROBE_SIZE = 256  # the timed probe: small enough that a slow bf16 path costs well under 1 s
FASTER_BY = 1.0  # bf16 must beat float32 outright (its point is speed and memory together)


def choose_cpu_dtype(
    flags: Collection[str] | None, timing: tuple[float, float] | None = None
) -> str:
    """The dtype ("bfloat16" or "float32") for frozen models on this CPU (pure).

    ``flags``: the CPU's feature flags, None when unknown. ``timing``: (bf16 seconds, float32
    seconds) of the same matmul, consulted only when the flags are unknown.
    """
    if flags is not None:
        return "bfloat16" if NATIVE_BF16_FLAGS & set(flags) else "float32"
    if timing is not None:
        bf16_s, fp32_s = timing
        return "bfloat16" if bf16_s * FASTER_BY < fp32_s else "float32"
    return "float32"  # nothing known: the safe choice (never very slow)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or None when not readable."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def time_matmul(size: int = PROBE_SIZE, repeats: int = 3) -> tuple[float, float]:
    """(bf16 seconds, float32 seconds): the best of ``repeats`` (size x size) matmuls each."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    best = []
    for dtype in (torch.bfloat16, torch.float32):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: kernel selection and allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return best[0], best[1]


@functools.cache
def cpu_auto_dtype() -> str:
    """What ``auto`` means on this machine's CPU, decided once per process (see the module)."""
    flags = cpu_flags()
    timing = time_matmul() if flags is None else None
    choice = choose_cpu_dtype(flags, timing)
    how = "CPU flags" if flags is not None else f"a timed matmul (bf16, fp32 seconds: {timing})"
    logger.info("dtype auto on this CPU: %s (decided from %s)", choice, how)
    return choice
