"""Memory estimates from configs alone (nothing loaded): pure functions plus a device probe.

Parameter counts come from building the model on the ``meta`` device, which allocates nothing
and is exact for any architecture transformers knows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from composer.architectures import model_shape
from composer.bridge import bridge_shape_for
from composer.config import CompositionConfig, read_recipe
from composer.hardware import default_device, resolve_dtype
from composer.loading import load_config
from composer.pacing import format_bytes
from composer.training_config import TrainingConfig

logger = logging.getLogger(__name__)

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
        device = default_device()
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


# ---------------------------------------------------------------------------------------------
# Training: activations and the plan shown by `calm-composer plan`

# Values a pre-norm decoder layer keeps for backward, per token: about 10 x width (norm inputs
# and outputs, q/k/v, attention output, residuals) + 4 x the MLP width (gate, up, activation,
# product), with fused attention (no T x T matrix). A rough, slightly generous rule of thumb.
_LAYER_WIDTHS, _LAYER_MLP_WIDTHS = 10, 4
_HEADROOM = 0.9  # a plan "fits" when it needs at most 90% of what is free (allocator, fragments)


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one training step needs on top of the frozen weights (estimates, from configs)."""

    bridge: int  # bridge weights + gradients + optimizer moments
    anchor_activations: int  # kept for backward in the anchor layers above the lowest connected
    bridge_activations: int  # the blocks' own, including (B, H, T, T) attention on the CPU path
    logits: int  # (B, T, vocab) logits, their float32 copy and its gradient

    @property
    def total(self) -> int:
        return self.bridge + self.anchor_activations + self.bridge_activations + self.logits


def training_peak_bytes(
    anchor_config: Any,
    bridge_shape: Any,  # composer.bridge.BridgeShape
    *,
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool = False,
    activation_bytes: int = 4,  # 2 under bf16 autocast or a bf16 anchor
    optimizer: str = "adamw",
    bridge_dtype: str = "float32",
) -> TrainingMemory:
    """Estimate a training step's memory beyond the frozen weights, for the longest batch (pure).

    Only anchor layers above the lowest connected one keep activations (nothing below needs a
    gradient; the specialist runs without autograd). With gradient checkpointing those layers
    keep only their inputs, plus one layer's activations while it is recomputed.
    """
    shape = model_shape(anchor_config)
    text = anchor_config.get_text_config() if hasattr(anchor_config, "get_text_config") else None
    mlp = getattr(text or anchor_config, "intermediate_size", None) or 4 * shape.width
    tokens = batch_size * max_length
    lowest = min(a for a, _ in bridge_shape.pairs)
    recorded = shape.num_layers - lowest - 1
    per_layer = tokens * (_LAYER_WIDTHS * shape.width + _LAYER_MLP_WIDTHS * mlp) * activation_bytes
    if gradient_checkpointing:
        anchor = recorded * tokens * shape.width * activation_bytes + min(recorded, 1) * per_layer
    else:
        anchor = recorded * per_layer
    per = _DTYPE_BYTES[bridge_dtype]
    kv_in = shape.width if bridge_shape.project_specialist else bridge_shape.d_specialist
    per_block = (
        tokens
        * per
        * (2 * shape.width + 4 * bridge_shape.inner + 2 * kv_in + bridge_shape.d_specialist)
        + batch_size * bridge_shape.num_heads * max_length * max_length * 4
    )
    bridge = bridge_training_bytes(bridge_shape.num_parameters(), dtype=bridge_dtype)
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        bridge -= bridge_shape.num_parameters() * 6  # two 1-byte moments instead of two float32
    logits = tokens * shape.vocab_size * (activation_bytes + 8)
    return TrainingMemory(
        bridge=bridge,
        anchor_activations=anchor,
        bridge_activations=per_block * len(bridge_shape.pairs),
        logits=logits,
    )


@dataclass(frozen=True)
class Plan:
    """What a recipe's training needs on this machine, per component, and whether it fits."""

    device: DeviceMemory
    components: tuple[tuple[str, int, str], ...]  # (name, bytes, how it was counted)
    bridge_parameters: int
    batch_size: int
    max_length: int

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.components)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= _HEADROOM * self.device.available_bytes

    def format(self) -> list[str]:
        """Human-readable lines: one per component, the total and the verdict."""
        width = max(len(name) for name, _, _ in self.components)
        lines = [
            f"training plan (batch {self.batch_size} x {self.max_length} tokens, "
            f"{self.bridge_parameters:,} bridge parameters):"
        ]
        for name, size, note in self.components:
            lines.append(f"  {name:<{width}}  {format_bytes(size):>10}  {note}")
        lines.append(f"  {'total':<{width}}  {format_bytes(self.total_bytes):>10}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"{verdict} in {self.device.name}: {gib(self.device.available_bytes)} free of "
            f"{gib(self.device.total_bytes)} (keeping 10% headroom)"
        )
        if not self.fits:
            lines.append(
                "to fit: lower training.batch_size or training.max_length, set "
                "training.gradient_checkpointing: true, or load the anchor with quantization: nf4"
            )
        return lines


def plan(
    recipe: Any,  # a recipe file path, a mapping or a CompositionConfig
    *,
    device: torch.device | None = None,
    model_configs: dict[str, Any] | None = None,  # {"anchor": ..., "specialist": ...} already read
    memory: DeviceMemory | None = None,  # a device to plan for instead of probing this machine's
) -> Plan:
    """Estimate a recipe's training memory from the models' configs alone (no weights loaded).

    Components: both frozen models' weights (at their quantization and dtype), the bridge with
    its gradients and optimizer state, and the activations of the longest batch. Pass
    ``model_configs`` when the configs are already read (reading a GGUF's takes seconds).
    """
    config = recipe if isinstance(recipe, CompositionConfig) else read_recipe(recipe)
    training = TrainingConfig.from_mapping(config.training)
    memory = memory or probe_device(device)
    target = device or default_device()
    components: list[tuple[str, int, str]] = []
    configs = {}
    dtypes = {}
    for role, spec in (("anchor", config.anchor), ("specialist", config.specialist)):
        model_config = configs[role] = (
            model_configs[role] if model_configs is not None else load_config(spec)
        )
        dtype = str(resolve_dtype(spec.dtype, target)).removeprefix("torch.")
        dtypes[role] = dtype
        count = count_parameters(model_config)
        size = weight_bytes(count, quantization=spec.quantization, dtype=dtype)
        components.append(
            (f"{role} weights", size, f"{count.total:,} parameters, {spec.quantization}, {dtype}")
        )
    shape = bridge_shape_for(configs["anchor"], configs["specialist"], config.bridge)
    bf16 = training.bf16 is True or (training.bf16 == "auto" and target.type == "cuda")
    activation_bytes = 2 if bf16 or dtypes["anchor"] != "float32" else 4
    step = training_peak_bytes(
        configs["anchor"],
        shape,
        batch_size=training.batch_size,
        max_length=training.max_length,
        gradient_checkpointing=training.gradient_checkpointing,
        activation_bytes=activation_bytes,
        optimizer=training.optimizer if target.type == "cuda" else "adamw",
        bridge_dtype=config.bridge.dtype,
    )
    checkpointing = "on" if training.gradient_checkpointing else "off"
    components += [
        ("bridge + grads + optimizer", step.bridge, f"{training.optimizer}, {config.bridge.dtype}"),
        ("anchor activations", step.anchor_activations, f"gradient checkpointing {checkpointing}"),
        ("bridge activations", step.bridge_activations, f"{len(shape.pairs)} block(s)"),
        ("logits", step.logits, "logits, float32 copy and gradient"),
    ]
    return Plan(
        device=memory,
        components=tuple(components),
        bridge_parameters=shape.num_parameters(),
        batch_size=training.batch_size,
        max_length=training.max_length,
    )
