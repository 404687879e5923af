"""What this machine computes well, and the device and dtype helpers everything else uses: the
default device, the dtype that ``auto`` means (on a CPU, decided below), the CUDA allocator.

bfloat16 halves the memory of frozen models, but only CPUs with native bf16 dot products run its
matmuls fast: measured on the 2-core AVX2-only CI kind, (300x1536 @ 1536x8960, one thread)
took 0.57 s in float32 and 75 s in bfloat16; on an AMD EPYC with AVX512-BF16, 0.19 s against
0.086 s. So ``auto`` is bfloat16 only where the CPU says it has bf16 instructions (Linux's
/proc/cpuinfo flags), and where flags cannot be read, only when a small timed matmul agrees.
The answer is decided once per process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import torch

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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA; on a CPU, bf16 only where it computes bf16 natively (else float32:
    bf16 matmuls are ~100x slower there; see :func:`cpu_auto_dtype`)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_auto_dtype() == "bfloat16" else torch.float32
    return DTYPES[name]


# Environment variables that choose the CUDA caching allocator's settings (the second is the
# newer name, torch >= 2.9); either one set means the user chose.
ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
DEFAULT_CUDA_ALLOCATOR = "expandable_segments:True"


def allocator_setting(environ: Mapping[str, str]) -> str | None:
    """The CUDA allocator setting to add, or None where the user already chose one (pure).

    Expandable segments let the caching allocator grow a segment in place instead of holding
    fragmented blocks. Measured on an H100 (docs/BENCHMARKS.md), same allocated peak: the 7B
    coder preset reserved 14.26 GiB with it and 15.44 GiB without; the math preset 11.13 vs
    12.44 GiB: the difference between fitting a 16 / 12 GB card or not.
    """
    if any(name in environ for name in ALLOCATOR_ENV):
        return None
    return DEFAULT_CUDA_ALLOCATOR


def configure_cuda_allocator() -> bool:
    """Set the allocator's settings before CUDA starts (it reads them once); True if it did."""
    setting = allocator_setting(os.environ)
    if setting is None or torch.cuda.is_initialized():
        return False
    os.environ[ALLOCATOR_ENV[0]] = setting
    logger.debug("%s=%s", ALLOCATOR_ENV[0], setting)
    return True


@contextlib.contextmanager
def flushed_denormals(enabled: bool) -> Iterator[None]:
    """On a CPU, treat subnormal floats (|x| < 1.2e-38 in float32) as zero inside the block.

    Late in training, as the loss falls, gradients through the frozen models reach subnormal
    values, and x86 CPUs compute those ~100x slower than normal floats: the default preset's
    steps slowed by 40% between its first and its last 100 steps (docs/BENCHMARKS.md). Flushed,
    each step costs the same. GPUs flush on their own. torch has no getter for the flag, so the
    block ends with torch's default (off).
    """
    if not enabled or not torch.set_flush_denormal(True):  # False: this CPU cannot (no SSE3)
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
