"""A training checkpoint: the bridge, the optimizer, the scheduler, the RNG states and the run's
position (:class:`RunState`), written atomically into ``DIR/checkpoints/step-N``
(:func:`composer.progress.write_checkpoint`), so a run killed at any moment resumes exactly.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from composer import progress
from composer.config import ConfigError
from composer.training_config import TrainingConfig

logger = logging.getLogger(__name__)

BRIDGE_TENSORS = "bridge.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.json"
RNG = "rng.safetensors"
STATE = "trainer_state.json"
# Settings that decide the data order and the step arithmetic: a checkpoint made with other values
# cannot be continued exactly.
RESUME_KEYS = ("batch_size", "grad_accum", "seed", "max_length")


def _rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return tensors, random.getstate()


def _restore_rng(tensors: dict[str, torch.Tensor], python_state: Any) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


@dataclass
class RunState:
    """What a checkpoint's trainer_state.json holds besides tensors."""

    step: int = 0
    micro_batches: int = 0  # global micro-batches consumed: the data position
    elapsed_s: float = 0.0  # training time of earlier sessions
    loss_sum: float = 0.0  # losses of steps since the last progress line
    loss_steps: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    # Eval loss before the first step, when there is an eval set: the zero-initialised bridge
    # adds nothing then, so this is the anchor alone, the "before" of every later eval loss.
    start_eval_loss: float | None = None


def save_checkpoint(
    output_dir: Path,
    *,
    bridge: nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: RunState,
    keep: int,
) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in bridge.state_dict().items()}
    rng_tensors, python_rng = _rng_state()

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / BRIDGE_TENSORS))
        torch.save(optimizer.state_dict(), folder / OPTIMIZER)
        (folder / SCHEDULER).write_text(json.dumps(scheduler.state_dict()), encoding="utf-8")
        save_file(rng_tensors, str(folder / RNG))
        record = {**state.__dict__, "python_rng": python_rng}
        (folder / STATE).write_text(json.dumps(record, indent=2), encoding="utf-8")

    return progress.write_checkpoint(output_dir, state.step, write, keep=keep)


def load_checkpoint(
    folder: Path, *, bridge: nn.Module, optimizer: Any, scheduler: Any, device: torch.device
) -> RunState:
    record = json.loads((folder / STATE).read_text(encoding="utf-8"))
    python_rng = record.pop("python_rng")
    state = RunState(**record)
    tensors = load_file(str(folder / BRIDGE_TENSORS), device=str(device))
    expected = {k: tuple(v.shape) for k, v in bridge.state_dict().items()}
    if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        raise ConfigError(
            f"the checkpoint {folder} holds a bridge of another shape than this recipe's (were "
            "the models or the bridge settings changed?); train into a new --output folder, or "
            "restore the recipe it was made with"
        )
    bridge.load_state_dict(tensors)
    optimizer.load_state_dict(
        torch.load(folder / OPTIMIZER, map_location=device, weights_only=True)
    )
    scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text(encoding="utf-8")))
    _restore_rng(load_file(str(folder / RNG)), python_rng)
    return state


def check_resumable(saved: Mapping[str, Any], current: TrainingConfig, folder: Path) -> None:
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(current, key):
            raise ConfigError(
                f"the checkpoint {folder} was made with training.{key}={saved[key]!r}, the recipe "
                f"now says {getattr(current, key)!r}; resuming would not continue the same run. "
                f"Set {key} back, or train into a new --output folder"
            )
    changed = [
        f"{key} {saved[key]!r} -> {value!r}"
        for key, value in current.to_dict().items()
        if key in saved and saved[key] != value
    ]
    if changed:
        logger.warning("settings changed since %s: %s", folder.name, ", ".join(changed))
