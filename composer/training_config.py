"""Frozen, validated settings for training a bridge: the recipe's ``training`` and ``data``.

Like :mod:`composer.config`, each section is a frozen pydantic dataclass whose field types say
what they accept; a bad value or an unknown key is a :class:`~composer.config.ConfigError`
naming the field, the value, what was expected and what to do. Relative data paths were resolved
against the recipe file's folder when the recipe was read (:func:`composer.config.resolve_paths`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Lt

from composer.config import (
    Flag,
    NonBlank,
    NonNegative,
    Number,
    Positive,
    build,
    require,
    section,
    setting,
)

Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
DataFormat = Literal["auto", "text", "prompt_completion", "messages"]
RowField = Literal["text", "prompt", "completion", "messages"]  # what data.columns may map onto
SCHEDULES, OPTIMIZERS = typing.get_args(Schedule), typing.get_args(Optimizer)
DATA_FORMATS, ROW_FIELDS = typing.get_args(DataFormat), typing.get_args(RowField)
Share = Annotated[Number, Ge(0), Lt(1)]  # a fraction in [0, 1)


@section("training")
class TrainingConfig:
    """How the bridge is trained. Step counts are optimizer steps.

    ``batch_size`` is the *global* micro-batch: with N data-parallel processes each one gets
    ``batch_size / N`` examples of it, so the loss curve does not depend on N. One optimizer
    step takes ``grad_accum`` micro-batches.
    """

    max_steps: Positive | None = setting(
        None,
        help="Optimizer steps; set, it overrides epochs (as in HF Trainer)",
        fix="or leave it out to train for training.epochs",
    )
    epochs: Annotated[Number, Gt(0)] = setting(
        1.0, help="Passes over the training file when max_steps is not set", fix="such as 1 or 0.5"
    )
    batch_size: Positive = setting(
        8,
        help="Examples per micro-batch, over all processes",
        fix="lower it if memory runs out, raise grad_accum instead",
    )
    grad_accum: Positive = setting(
        1,
        help="Micro-batches per optimizer step: a larger batch in the same memory",
        fix="1 means no accumulation",
    )
    lr: Annotated[Number, Gt(0), Lt(1)] = setting(
        1e-3,
        help="Peak learning rate; 1e-3 trains the zero-initialised bridge stably",
        fix="e.g. 1e-3",
    )
    weight_decay: Annotated[Number, Ge(0)] = setting(
        0.0,
        help="AdamW weight decay; decay only pulls the bridge back towards the bare anchor",
        fix="0: off",
    )
    warmup_steps: NonNegative | None = setting(
        None,
        help="Linear warmup steps; set, it overrides warmup_ratio",
        fix="or leave it out to use training.warmup_ratio",
    )
    warmup_ratio: Share = setting(
        0.03,
        help="Share of the steps spent warming up (when warmup_steps is unset)",
        fix="e.g. 0.03",
    )
    schedule: Schedule = setting(
        "cosine", help="Learning-rate decay after warmup: cosine, linear or constant"
    )
    max_grad_norm: Annotated[Number, Ge(0)] | None = setting(
        1.0, help="Gradient clipping; null or 0 turns it off", fix="0 or null turns clipping off"
    )
    max_length: Positive = setting(
        512, help="Tokens per example; longer ones are cut (keeping the start)", fix="e.g. 512"
    )
    eval_every: NonNegative = setting(
        0, help="Optimizer steps between eval losses; 0: only at the end", fix="0: only at the end"
    )
    logging_every: Positive = setting(
        10, help="Optimizer steps between lines of progress.jsonl", fix="e.g. 10"
    )
    save_every: Positive = setting(
        100,
        help="Optimizer steps between checkpoints (also on stop and at the end)",
        fix="e.g. 100",
    )
    keep_checkpoints: Positive = setting(
        2, help="Newest checkpoints kept; older ones are deleted", fix="e.g. 2"
    )
    seed: NonNegative = setting(
        0, help="Seed of the bridge's initialisation, data order and eval split"
    )
    bf16: Flag | Literal["auto"] = setting(
        "auto",
        help="bf16 autocast; auto: on CUDA with bf16 support, fp32 on a CPU",
        expect="auto, true or false",
    )
    gradient_checkpointing: Flag = setting(
        False, help="Recompute anchor layers in backward: less memory, more time"
    )
    optimizer: Optimizer = setting(
        "adamw",
        help="adamw, or adamw_8bit / paged_adamw_8bit (bitsandbytes, need CUDA)",
        fix="the 8-bit ones need bitsandbytes and a CUDA GPU",
    )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TrainingConfig:
        """Build from the recipe's ``training`` section, rejecting unknown keys."""
        return build(cls, values or {}, "training")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: max_steps, or enough for ``epochs`` passes (at least 1)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accum))

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_ratio * total_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_A_DATA_FILE = "the path of a data file (.jsonl, .json, .csv, .parquet or .txt)"


@section("data")
class DataConfig:
    """Which files the bridge is trained and evaluated on (see :mod:`composer.data` for shapes)."""

    train: NonBlank | None = setting(
        None,
        help="Training file (.jsonl/.json/.csv/.parquet/.txt), relative to the recipe",
        expect=_A_DATA_FILE,
    )
    eval: NonBlank | None = setting(
        None,
        help="Eval file; when unset, eval_fraction of train may be held out",
        expect=_A_DATA_FILE,
    )
    eval_fraction: Share = setting(
        0.0,
        help="Share of the training file held out for eval losses; 0: no eval",
        fix="such as 0.05; 0: no eval split",
    )
    format: DataFormat = setting(
        "auto", help="auto: detected from the first rows; else checked against them"
    )
    columns: dict[str, RowField] | None = setting(
        None,
        help="{file column: our field}, e.g. {question: prompt, answer: completion} for GSM8K",
        expect=f"a mapping from a column of the file to one of {', '.join(ROW_FIELDS)}, e.g. "
        "{question: prompt, answer: completion}",
    )

    def __post_init__(self) -> None:
        require(
            not (self.eval is not None and self.eval_fraction > 0),
            f"both data.eval ({self.eval}) and data.eval_fraction ({self.eval_fraction}) are set; "
            "expected one way to get an eval set; drop one of them",
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> DataConfig:
        """Build from the recipe's ``data`` section (its paths were resolved when the recipe was
        read: :func:`composer.config.resolve_paths`)."""
        return build(cls, values or {}, "data")

    def require_train(self) -> str:
        """The training file's path; raises ConfigError when the recipe names none."""
        require(
            self.train is not None,
            "the recipe has no data.train; add a 'data:' section with 'train: path/to/train.jsonl' "
            "(relative paths are read from the recipe's folder)",
        )
        assert self.train is not None
        return self.train
