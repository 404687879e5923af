"""One report on a recipe's pair, from the models' configs alone (no weights): each model, whether
the two compose (:mod:`composer.pair_check`), the layer pairs, the bridge's size, and the
training memory plan with its one "fits" rule (:class:`composer.memory.Plan`).

``calm-composer info`` prints :meth:`PairReport.lines`, ``calm-composer plan`` its memory part, and
the app's Compose tab renders the same report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from composer.architectures import model_shape
from composer.bridge import bridge_shape_for
from composer.config import CompositionConfig, ConfigError
from composer.loading import load_config
from composer.memory import (
    GIB,
    DeviceMemory,
    Plan,
    bridge_training_bytes,
    count_parameters,
    gib,
    plan,
)
from composer.pair_check import pair_problems, vocabulary_note
from composer.training_config import TrainingConfig

ROLES = ("anchor", "specialist")


@dataclass
class PairReport:
    """What can be said of a recipe's pair before loading any weights."""

    title: str  # the recipe's name or file
    problems: list[str] = field(default_factory=list)  # why it cannot be composed
    notes: list[str] = field(default_factory=list)  # each model, and how they share a vocabulary
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (anchor layer, specialist layer)
    anchor_layers: int = 0
    specialist_layers: int = 0
    num_heads: int = 0
    head_dim: int = 0
    bridge_parameters: int = 0
    anchor_parameters: int = 0
    plan: Plan | None = None  # None when the models could not be read or the plan failed
    plan_error: str = ""

    @property
    def compatible(self) -> bool:
        return not self.problems

    @property
    def fits(self) -> bool | None:
        """The plan's verdict (peak training memory within 90% of what is free); None: unknown."""
        return self.plan.fits if self.plan is not None else None

    @property
    def memory(self) -> list[str]:
        """The training plan, line by line (or why there is none)."""
        if self.plan is not None:
            return self.plan.format()
        return [f"no memory estimate: {self.plan_error}"] if self.plan_error else []

    def lines(self) -> list[str]:
        """The whole report as text (what ``calm-composer info`` prints)."""
        out = [f"recipe: {self.title}"]
        out += self.notes
        out += [f"problem: {p}" for p in self.problems]
        if self.pairs:
            share = (
                f" ({100 * self.bridge_parameters / self.anchor_parameters:.2f}% of the anchor)"
                if self.anchor_parameters
                else ""
            )
            out.append(
                f"bridge: {len(self.pairs)} blocks, {self.num_heads} heads x {self.head_dim}, "
                f"{self.bridge_parameters:,} parameters{share}, "
                f"{gib(bridge_training_bytes(self.bridge_parameters))} with gradients and AdamW "
                "state"
            )
            out.append("layer pairs (anchor layer <- specialist layer, 0-based):")
            out += [f"  {a:>3} <- {s}" for a, s in self.pairs]
        return out + self.memory


def describe(
    recipe: CompositionConfig,
    *,
    title: str = "",
    configs: Mapping[str, Any] | None = None,
    tokenizers_match: Callable[[], bool | None] | None = None,
    **plan_kwargs: Any,  # device= / memory= for composer.memory.plan
) -> PairReport:
    """The report for ``recipe``.

    ``configs``: each model's config already read, or the ConfigError reading it raised (the
    app keeps both); without it both are read here and a model that cannot be read raises.
    ``tokenizers_match``: see :func:`composer.pair_check.tokenizer_check`.
    """
    report = PairReport(title=title or recipe.name or "recipe")
    if configs is None:
        configs = {role: load_config(getattr(recipe, role)) for role in ROLES}
    read = {}
    for role in ROLES:
        spec, config = getattr(recipe, role), configs[role]
        if isinstance(config, ConfigError):
            report.problems.append(f"{role}: {config}")
            continue
        read[role] = config
        shape = model_shape(config)
        count = count_parameters(config)
        report.notes.append(
            f"{role}: {spec.model} [{spec.quantization}] {shape.model_type}, {shape.num_layers} "
            f"layers x {shape.width}, {shape.num_heads} heads, vocabulary {shape.vocab_size:,}, "
            f"{count.total / 1e6:,.1f}M parameters"
        )
    if len(read) < len(ROLES):
        return report
    anchor, specialist = model_shape(read["anchor"]), model_shape(read["specialist"])
    report.anchor_layers, report.specialist_layers = anchor.num_layers, specialist.num_layers
    training = TrainingConfig.from_mapping(recipe.training)
    explicit = training.max_length if "max_length" in recipe.training else None
    report.problems += pair_problems(recipe, read, max_length=explicit)
    report.notes.append(vocabulary_note(read, tokenizers_match() if tokenizers_match else None))
    try:
        shape = bridge_shape_for(read["anchor"], read["specialist"], recipe.bridge)
    except ConfigError:
        return report  # pair_problems said why
    report.pairs = [tuple(p) for p in shape.pairs]
    report.num_heads, report.head_dim = shape.num_heads, shape.head_dim
    report.bridge_parameters = shape.num_parameters()
    report.anchor_parameters = count_parameters(read["anchor"]).total
    try:
        report.plan = plan(recipe, model_configs=read, **plan_kwargs)
    except ConfigError as exc:
        report.plan_error = str(exc)
    return report


def planned_device(gpu_gb: float | None) -> dict[str, Any]:
    """``plan_kwargs`` for planning on a CUDA GPU of ``gpu_gb`` GiB ({}: this machine)."""
    if gpu_gb is None:
        return {}
    if gpu_gb <= 0:
        raise ConfigError(f"--gpu-gb is {gpu_gb}; expected the GPU's memory in GiB, e.g. 12")
    import torch

    size = int(gpu_gb * GIB)
    gpu = DeviceMemory(name=f"a {gpu_gb:g} GiB CUDA GPU", total_bytes=size, available_bytes=size)
    return {"device": torch.device("cuda"), "memory": gpu}
