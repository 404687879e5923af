"""bitsandbytes quantisation of a frozen model: the load-time settings (``nf4``/``int8``), nf4
in memory for GGUF files (which transformers will not quantise while loading), and the CPU guard
without which 4-bit backward silently breaks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def quantization_config(kind: str, device: torch.device) -> Any:
    """bitsandbytes settings for ``nf4`` (4-bit, double quant) or ``int8``; None for ``none``."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            # bf16 compute on a GPU; float32 on a CPU, where bf16 matmuls are slow.
            bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def disable_cpu_bf16_repack(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU AVX512-BF16 repacking, which breaks backward after a no-grad forward.

    On CPUs with AVX512-BF16 the first eval-mode no-grad forward repacks 4-bit weights into an
    inference layout for good; later backward passes then drop the input gradient silently (or
    raise). Must run before any forward. Returns how many layers were changed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantize_nf4_in_memory(
    model: nn.Module, *, device: torch.device, compute_dtype: torch.dtype
) -> int:
    """Replace every nn.Linear but the output head by a bitsandbytes nf4 Linear4bit (double quant).

    Used for GGUF files, which transformers refuses to quantise while loading. Returns the
    number of layers replaced.
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,  # double quantisation
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.to(torch.float32 if device.type == "cpu" else torch.bfloat16),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=True,
        ).to(device)  # moving to a device quantises
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        setattr(parent, child, quantized)
    return len(targets)
