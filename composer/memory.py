"""Memory estimates from configs alone (nothing loaded): pure functions plus a device probe.

Parameter counts come from building the model on the ``meta`` device, which allocates nothing
and is exact for any architecture transformers knows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# nf4 with double quantisation: 4 bits per weight + ~0.127 bits of quantisation constants.
_NF4_BYTES = 0.5 + 0.127 / 8
_INT8_BYTES = 1.0 + 4 / 4096  # a byte per weight + a float32 scale per row of ~4096


@dataclass(frozen=True)
class ParameterCount:
    total: int
    quantizable: int  # weights of nn.Linear layers other than the output head


def count_parameters(config: Any) -> ParameterCount:
    """Exact parameter counts of the causal LM a config describes, without allocating it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    quantizable = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )
    return ParameterCount(total=sum(p.numel() for p in model.parameters()), quantizable=quantizable)


def weight_bytes(count: ParameterCount, *, quantization: str, dtype: str) -> int:
    """Bytes of a model's weights once loaded (pure)."""
    per = _DTYPE_BYTES[dtype]
    if quantization == "none":
        return count.total * per
    quantized = _NF4_BYTES if quantization == "nf4" else _INT8_BYTES
    return int(count.quantizable * quantized + (count.total - count.quantizable) * per)


def bridge_training_bytes(num_parameters: int, *, dtype: str = "float32") -> int:
    """Bridge weights + gradients + AdamW's two moments (moments kept in float32)."""
    per = _DTYPE_BYTES[dtype]
    return num_parameters * (2 * per + 8)


@dataclass(frozen=True)
class DeviceMemory:
    name: str  # e.g. "cuda:0 (NVIDIA H100)" or "cpu"
    total_bytes: int
    available_bytes: int


def probe_device(device: torch.device | None = None) -> DeviceMemory:
    """Memory of the device training/inference would use (CUDA if present, else system RAM)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(
            name=f"{device} ({torch.cuda.get_device_name(device)})",
            total_bytes=total,
            available_bytes=free,
        )
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        available = total
    return DeviceMemory(name="cpu (system RAM)", total_bytes=total, available_bytes=available)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
