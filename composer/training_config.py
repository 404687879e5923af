"""Frozen, validated settings for training a bridge: the recipe's ``training`` and ``data``.

Like :mod:`composer.config`, every dataclass validates itself in ``__post_init__`` and raises
:class:`~composer.config.ConfigError` naming the field, the value, what was expected and what to
do. ``from_mapping`` rejects unknown keys. Relative data paths were resolved against the recipe
file's folder when the recipe was read (:func:`composer.config.resolve_paths`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from composer.config import ConfigError, check_keys, is_int, is_number, require, setting

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages")
ROW_FIELDS = ("text", "prompt", "completion", "messages")  # what data.columns may map onto


@dataclass(frozen=True)
class TrainingConfig:
    """How the bridge is trained. Step counts are optimizer steps.

    ``batch_size`` is the *global* micro-batch: with N data-parallel processes each one gets
    ``batch_size / N`` examples of it, so the loss curve does not depend on N. One optimizer
    step takes ``grad_accum`` micro-batches.
    """

    max_steps: int | None = setting(
        None, help="Optimizer steps; set, it overrides epochs (as in HF Trainer)"
    )
    epochs: float = setting(1.0, help="Passes over the training file when max_steps is not set")
    batch_size: int = setting(8, help="Examples per micro-batch, over all processes")
    grad_accum: int = setting(
        1, help="Micro-batches per optimizer step: a larger batch in the same memory"
    )
    lr: float = setting(
        1e-3, help="Peak learning rate; 1e-3 trains the zero-initialised bridge stably"
    )
    weight_decay: float = setting(
        0.0, help="AdamW weight decay; decay only pulls the bridge back towards the bare anchor"
    )
    warmup_steps: int | None = setting(
        None, help="Linear warmup steps; set, it overrides warmup_ratio"
    )
    warmup_ratio: float = setting(
        0.03, help="Share of the steps spent warming up (when warmup_steps is unset)"
    )
    schedule: str = setting(
        "cosine", help="Learning-rate decay after warmup: cosine, linear or constant"
    )
    max_grad_norm: float | None = setting(1.0, help="Gradient clipping; null or 0 turns it off")
    max_length: int = setting(
        512, help="Tokens per example; longer ones are cut (keeping the start)"
    )
    eval_every: int = setting(0, help="Optimizer steps between eval losses; 0: only at the end")
    logging_every: int = setting(10, help="Optimizer steps between lines of progress.jsonl")
    save_every: int = setting(
        100, help="Optimizer steps between checkpoints (also on stop and at the end)"
    )
    keep_checkpoints: int = setting(2, help="Newest checkpoints kept; older ones are deleted")
    seed: int = setting(0, help="Seed of the bridge's initialisation, data order and eval split")
    bf16: bool | str = setting(
        "auto", help="bf16 autocast; auto: on CUDA with bf16 support, fp32 on a CPU"
    )
    gradient_checkpointing: bool = setting(
        False, help="Recompute anchor layers in backward: less memory, more time"
    )
    optimizer: str = setting(
        "adamw", help="adamw, or adamw_8bit / paged_adamw_8bit (bitsandbytes, need CUDA)"
    )

    def __post_init__(self) -> None:
        _positive_int = "expected a whole number >= 1"
        if self.max_steps is not None:
            require(
                is_int(self.max_steps) and self.max_steps >= 1,
                f"training.max_steps is {self.max_steps!r}; {_positive_int}, or leave it out to "
                "train for training.epochs",
            )
        require(
            is_number(self.epochs) and self.epochs > 0,
            f"training.epochs is {self.epochs!r}; expected a number > 0 such as 1 or 0.5",
        )
        for name, hint in (
            ("batch_size", "lower it if memory runs out, raise grad_accum instead"),
            ("grad_accum", "1 means no accumulation"),
            ("max_length", "e.g. 512; longer examples are cut"),
            ("logging_every", "e.g. 10"),
            ("save_every", "e.g. 100"),
            ("keep_checkpoints", "e.g. 2"),
        ):
            value = getattr(self, name)
            require(
                is_int(value) and value >= 1,
                f"training.{name} is {value!r}; {_positive_int} ({hint})",
            )
        require(
            is_int(self.eval_every) and self.eval_every >= 0,
            f"training.eval_every is {self.eval_every!r}; expected a whole number >= 0 "
            "(0: evaluate only at the end)",
        )
        require(
            is_number(self.lr) and 0 < self.lr < 1,
            f"training.lr is {self.lr!r}; expected a number in (0, 1), e.g. 1e-3",
        )
        require(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            f"training.weight_decay is {self.weight_decay!r}; expected a number >= 0 (0: off)",
        )
        if self.warmup_steps is not None:
            require(
                is_int(self.warmup_steps) and self.warmup_steps >= 0,
                f"training.warmup_steps is {self.warmup_steps!r}; expected a whole number >= 0, "
                "or leave it out to use training.warmup_ratio",
            )
        require(
            is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
            f"training.warmup_ratio is {self.warmup_ratio!r}; expected a number in [0, 1) "
            "such as 0.03",
        )
        require(
            self.schedule in SCHEDULES,
            f"training.schedule is {self.schedule!r}; expected one of {', '.join(SCHEDULES)}",
        )
        if self.max_grad_norm is not None:
            require(
                is_number(self.max_grad_norm) and self.max_grad_norm >= 0,
                f"training.max_grad_norm is {self.max_grad_norm!r}; expected a number >= 0 "
                "(0 or null turns clipping off)",
            )
        require(
            is_int(self.seed) and self.seed >= 0,
            f"training.seed is {self.seed!r}; expected a whole number >= 0",
        )
        require(
            isinstance(self.bf16, bool) or self.bf16 == "auto",
            f"training.bf16 is {self.bf16!r}; expected auto, true or false",
        )
        require(
            isinstance(self.gradient_checkpointing, bool),
            f"training.gradient_checkpointing is {self.gradient_checkpointing!r}; "
            "expected true or false",
        )
        require(
            self.optimizer in OPTIMIZERS,
            f"training.optimizer is {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)} "
            "(the 8-bit ones need bitsandbytes and a CUDA GPU)",
        )

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> TrainingConfig:
        """Build from the recipe's ``training`` section, rejecting unknown keys."""
        values = check_keys(cls, section or {}, "training")
        try:
            return cls(**values)
        except TypeError as exc:  # a value __post_init__ could not even compare
            raise ConfigError(f"bad settings in 'training': {exc}") from None

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


@dataclass(frozen=True)
class DataConfig:
    """Which files the bridge is trained and evaluated on (see :mod:`composer.data` for shapes)."""

    train: str | None = setting(
        None, help="Training file (.jsonl/.json/.csv/.parquet/.txt), relative to the recipe"
    )
    eval: str | None = setting(
        None, help="Eval file; when unset, eval_fraction of train may be held out"
    )
    eval_fraction: float = setting(
        0.0, help="Share of the training file held out for eval losses; 0: no eval"
    )
    format: str = setting(
        "auto", help="auto: detected from the first rows; else checked against them"
    )
    columns: Mapping[str, str] | None = setting(
        None,
        help="{file column: our field}, e.g. {question: prompt, answer: completion} for GSM8K",
    )

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            value = getattr(self, name)
            require(
                value is None or (isinstance(value, str) and value.strip() != ""),
                f"data.{name} is {value!r}; expected the path of a data file "
                "(.jsonl, .json, .csv, .parquet or .txt)",
            )
        require(
            is_number(self.eval_fraction) and 0 <= self.eval_fraction < 1,
            f"data.eval_fraction is {self.eval_fraction!r}; expected a number in [0, 1) such as "
            "0.05 (0: no eval split)",
        )
        require(
            not (self.eval is not None and self.eval_fraction > 0),
            f"both data.eval ({self.eval}) and data.eval_fraction ({self.eval_fraction}) are set; "
            "expected one way to get an eval set; drop one of them",
        )
        if self.columns is not None:
            require(
                isinstance(self.columns, Mapping)
                and all(isinstance(k, str) and v in ROW_FIELDS for k, v in self.columns.items()),
                f"data.columns is {self.columns!r}; expected a mapping from a column of the file "
                f"to one of {', '.join(ROW_FIELDS)}, e.g. {{question: prompt, answer: completion}}",
            )
            object.__setattr__(self, "columns", dict(self.columns))
        require(
            self.format in DATA_FORMATS,
            f"data.format is {self.format!r}; expected one of {', '.join(DATA_FORMATS)}",
        )

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> DataConfig:
        """Build from the recipe's ``data`` section (its paths were resolved when the recipe was
        read: :func:`composer.config.resolve_paths`)."""
        values = check_keys(cls, section or {}, "data")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"bad settings in 'data': {exc}") from None

    def require_train(self) -> str:
        """The training file's path; raises ConfigError when the recipe names none."""
        require(
            self.train is not None,
            "the recipe has no data.train; add a 'data:' section with 'train: path/to/train.jsonl' "
            "(relative paths are read from the recipe's folder)",
        )
        assert self.train is not None
        return self.train
