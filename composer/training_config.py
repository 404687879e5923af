"""Frozen, validated settings for training a bridge: the recipe's ``training`` and ``data``.

Like :mod:`composer.config`, every dataclass validates itself in ``__post_init__`` and raises
:class:`~composer.config.ConfigError` naming the field, the value, what was expected and what to
do. ``from_mapping`` rejects unknown keys. Relative data paths resolve against the recipe file's
folder (see :meth:`DataConfig.from_mapping`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.config import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages")
ROW_FIELDS = ("text", "prompt", "completion", "messages")  # what data.columns may map onto


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_keys(cls: type, section: Any, where: str) -> dict[str, Any]:
    _require(
        isinstance(section, Mapping),
        f"'{where}' is {section!r}; expected a mapping of settings (YAML 'key: value' lines)",
    )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    _require(
        not unknown,
        f"unknown setting(s) {unknown} in '{where}'; expected some of {sorted(known)}; "
        "fix the spelling or remove them",
    )
    return dict(section)


@dataclass(frozen=True)
class TrainingConfig:
    """How the bridge is trained. Step counts are optimizer steps.

    ``batch_size`` is the *global* micro-batch: with N data-parallel processes each one gets
    ``batch_size / N`` examples of it, so the loss curve does not depend on N. One optimizer
    step takes ``grad_accum`` micro-batches.
    """

    max_steps: int | None = None  # optimizer steps; set, it overrides epochs (as in HF Trainer)
    epochs: float = 1.0  # passes over the training file when max_steps is not set
    batch_size: int = 8  # examples per micro-batch, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step: a larger batch in the same memory
    lr: float = 1e-3  # peak learning rate; 1e-3 trains the zero-initialised bridge stably
    weight_decay: float = 0.0  # decay only pulls the bridge back towards the bare anchor
    warmup_steps: int | None = None  # linear warmup steps; set, it overrides warmup_ratio
    warmup_ratio: float = 0.03  # share of max_steps spent warming up (when warmup_steps unset)
    schedule: str = "cosine"  # learning-rate decay after warmup: cosine, linear or constant
    max_grad_norm: float | None = 1.0  # gradient clipping; None or 0 turns it off
    max_length: int = 512  # tokens per example; longer ones are cut (keeping the start)
    eval_every: int = 0  # optimizer steps between eval losses; 0: only at the end
    logging_every: int = 10  # optimizer steps between lines of progress.jsonl
    save_every: int = 100  # optimizer steps between checkpoints (also on stop and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    seed: int = 0  # bridge initialisation, data order, eval split
    bf16: bool | str = "auto"  # auto: bf16 autocast on CUDA with bf16 support; fp32 on CPU
    gradient_checkpointing: bool = False  # recompute anchor layers in backward: less memory
    optimizer: str = "adamw"  # adamw_8bit / paged_adamw_8bit (bitsandbytes) need CUDA

    def __post_init__(self) -> None:
        _positive_int = "expected a whole number >= 1"
        if self.max_steps is not None:
            _require(
                _is_int(self.max_steps) and self.max_steps >= 1,
                f"training.max_steps is {self.max_steps!r}; {_positive_int}, or leave it out to "
                "train for training.epochs",
            )
        _require(
            _is_number(self.epochs) and self.epochs > 0,
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
            _require(
                _is_int(value) and value >= 1,
                f"training.{name} is {value!r}; {_positive_int} ({hint})",
            )
        _require(
            _is_int(self.eval_every) and self.eval_every >= 0,
            f"training.eval_every is {self.eval_every!r}; expected a whole number >= 0 "
            "(0: evaluate only at the end)",
        )
        _require(
            _is_number(self.lr) and 0 < self.lr < 1,
            f"training.lr is {self.lr!r}; expected a number in (0, 1), e.g. 1e-3",
        )
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            f"training.weight_decay is {self.weight_decay!r}; expected a number >= 0 (0: off)",
        )
        if self.warmup_steps is not None:
            _require(
                _is_int(self.warmup_steps) and self.warmup_steps >= 0,
                f"training.warmup_steps is {self.warmup_steps!r}; expected a whole number >= 0, "
                "or leave it out to use training.warmup_ratio",
            )
        _require(
            _is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
            f"training.warmup_ratio is {self.warmup_ratio!r}; expected a number in [0, 1) "
            "such as 0.03",
        )
        _require(
            self.schedule in SCHEDULES,
            f"training.schedule is {self.schedule!r}; expected one of {', '.join(SCHEDULES)}",
        )
        if self.max_grad_norm is not None:
            _require(
                _is_number(self.max_grad_norm) and self.max_grad_norm >= 0,
                f"training.max_grad_norm is {self.max_grad_norm!r}; expected a number >= 0 "
                "(0 or null turns clipping off)",
            )
        _require(
            _is_int(self.seed) and self.seed >= 0,
            f"training.seed is {self.seed!r}; expected a whole number >= 0",
        )
        _require(
            isinstance(self.bf16, bool) or self.bf16 == "auto",
            f"training.bf16 is {self.bf16!r}; expected auto, true or false",
        )
        _require(
            isinstance(self.gradient_checkpointing, bool),
            f"training.gradient_checkpointing is {self.gradient_checkpointing!r}; "
            "expected true or false",
        )
        _require(
            self.optimizer in OPTIMIZERS,
            f"training.optimizer is {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)} "
            "(the 8-bit ones need bitsandbytes and a CUDA GPU)",
        )

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None) -> TrainingConfig:
        """Build from the recipe's ``training`` section, rejecting unknown keys."""
        values = _check_keys(cls, section or {}, "training")
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

    train: str | None = None  # .jsonl/.json/.csv/.parquet/.txt; relative: to the recipe's folder
    eval: str | None = None  # eval file; when unset, eval_fraction of train may be held out
    eval_fraction: float = 0.0  # share of train held out for eval losses; 0: no eval
    format: str = "auto"  # auto: detected from the first rows; else checked against them
    # {file column: our field}, e.g. {question: prompt, answer: completion} for GSM8K's parquet
    columns: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        for name in ("train", "eval"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, str) and value.strip() != ""),
                f"data.{name} is {value!r}; expected the path of a data file "
                "(.jsonl, .json, .csv, .parquet or .txt)",
            )
        _require(
            _is_number(self.eval_fraction) and 0 <= self.eval_fraction < 1,
            f"data.eval_fraction is {self.eval_fraction!r}; expected a number in [0, 1) such as "
            "0.05 (0: no eval split)",
        )
        _require(
            not (self.eval is not None and self.eval_fraction > 0),
            f"both data.eval ({self.eval}) and data.eval_fraction ({self.eval_fraction}) are set; "
            "expected one way to get an eval set; drop one of them",
        )
        if self.columns is not None:
            _require(
                isinstance(self.columns, Mapping)
                and all(isinstance(k, str) and v in ROW_FIELDS for k, v in self.columns.items()),
                f"data.columns is {self.columns!r}; expected a mapping from a column of the file "
                f"to one of {', '.join(ROW_FIELDS)}, e.g. {{question: prompt, answer: completion}}",
            )
            object.__setattr__(self, "columns", dict(self.columns))
        _require(
            self.format in DATA_FORMATS,
            f"data.format is {self.format!r}; expected one of {', '.join(DATA_FORMATS)}",
        )

    @classmethod
    def from_mapping(
        cls, section: Mapping[str, Any] | None, *, base: str | Path | None = None
    ) -> DataConfig:
        """Build from the recipe's ``data`` section; relative paths are joined to ``base``."""
        values = _check_keys(cls, section or {}, "data")
        try:
            config = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"bad settings in 'data': {exc}") from None
        return config.resolved(base) if base is not None else config

    def resolved(self, base: str | Path) -> DataConfig:
        """The same settings with relative paths made absolute against ``base`` (~ expanded)."""

        def resolve(value: str | None) -> str | None:
            if value is None:
                return None
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else Path(base) / path)

        return dataclasses.replace(self, train=resolve(self.train), eval=resolve(self.eval))

    def require_train(self) -> str:
        """The training file's path; raises ConfigError when the recipe names none."""
        _require(
            self.train is not None,
            "the recipe has no data.train; add a 'data:' section with 'train: path/to/train.jsonl' "
            "(relative paths are read from the recipe's folder)",
        )
        assert self.train is not None
        return self.train
