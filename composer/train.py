"""The training run: data -> bridge steps -> checkpoints -> the finished bridge folder.

``train(recipe, output_dir=DIR)`` trains only the bridge (the anchor and specialist stay frozen)
with accelerate, so the same code runs on a CPU, a GPU, or N processes under ``torchrun``
(data parallel: every process gets its shard of each global batch; only rank 0 writes files).

Exact resume: the data order is a pure function of (seed, epoch), and a checkpoint holds the
bridge, the optimizer, the scheduler, the RNG states and the step, so re-running the same command
on the same folder continues the same loss curve to the same bridge. The loss of one optimizer
step is the mean over every loss token of its global batch, whatever the number of processes and
micro-batches, so 1 and N processes compute the same gradients.

Files written: see :mod:`composer.progress`.

Why one module of ~800 lines: it is the run's driver (``train`` and ``_Run``), read top to
bottom as one story; its pure decisions sit at the top, and checkpoint I/O
(:mod:`composer.checkpoints`) and the run's guards (:mod:`composer.run_guards`) live apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from composer import checkpoints, identity, progress, run_guards, run_lock
from composer.architectures import decoder_layers, positions_of
from composer.batches import collate, length_grouped_batches
from composer.config import CompositionConfig, ConfigError, read_recipe, resolve_paths
from composer.data import IGNORE_INDEX, Example, load_dataset
from composer.hardware import configure_cuda_allocator, flushed_denormals
from composer.pacing import Pacer, eta_seconds, format_duration
from composer.pair_check import position_problems
from composer.training_config import DataConfig, TrainingConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from composer.composition import Composition

logger = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """The run was asked to stop (STOP file, SIGINT, SIGTERM) and left a resumable checkpoint."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(
            f"training stopped after step {step}; checkpoint {checkpoint}; run the same command "
            "again to resume"
        )
        self.step = step
        self.checkpoint = checkpoint


class TrainingFailed(ConfigError):
    """The run cannot go on with these settings (e.g. out of memory); the message says why."""

    exit_code = 1  # a failure of the run, not a mistake in the command (the CLI's exit status)


# ---------------------------------------------------------------------------------------------
# Pure decisions: batches, loss normalisation, schedule


@dataclass
class BatchStream:
    """The global micro-batches of a run, in order: epoch e is a length-grouped shuffle with
    seed ``seed + e``. Micro-batch m of the run is a pure function of m (exact resume)."""

    examples: Sequence[Example]
    batch_size: int
    seed: int
    _epochs: dict[int, list[list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.batches_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {
                epoch: length_grouped_batches(
                    self.examples, batch_size=self.batch_size, seed=self.seed + epoch
                )
            }
        return self._epochs[epoch]

    def micro_batch(self, m: int) -> list[int]:
        """Example indices of the run's m-th global micro-batch (0-based)."""
        epoch, index = divmod(m, self.batches_per_epoch)
        return self._epoch(epoch)[index]

    def epoch_at(self, micro_batches_done: int) -> float:
        return micro_batches_done / self.batches_per_epoch


def loss_tokens(example: Example) -> int:
    """Tokens of an example that carry loss (position 0 predicts nothing)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def shard(indices: Sequence[int], *, rank: int, world_size: int) -> list[int]:
    """This process's part of a global micro-batch (round robin; may be empty)."""
    return list(indices[rank::world_size])


def resolve_bf16(setting: bool | str, *, cuda: bool, bf16_supported: bool) -> bool:
    """auto: bf16 autocast only on a CUDA device that supports it (CPUs: fp32, bf16 is slow)."""
    if setting == "auto":
        return cuda and bf16_supported
    return bool(setting)


def scheduler_name(config: TrainingConfig) -> str:
    return {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        config.schedule
    ]


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing of the anchor


def checkpointed_anchor_layers(composition: Composition) -> list[nn.Module]:
    """Anchor layers that autograd records: those above the lowest connected layer."""
    lowest = min(a for a, _ in composition.pairs)
    return list(decoder_layers(composition.anchor))[lowest + 1 :]


@contextlib.contextmanager
def gradient_checkpointing(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Recompute each layer's forward in backward instead of keeping its activations.

    The layer's own ``forward`` is wrapped (not ``__call__``), so forward hooks, such as the
    bridge's residual hooks, run outside the recomputed region: in backward the layer is
    recomputed without the (by then removed) hooks, which is exactly what it computed in forward.
    transformers' ``gradient_checkpointing_enable`` cannot be used: it only acts in training mode
    and would put the hooks inside the recomputed region. Restored on exit.
    """
    from torch.utils.checkpoint import checkpoint

    patched: list[tuple[nn.Module, Any]] = []
    try:
        for layer in layers:
            original = layer.__dict__.get("forward")
            forward = layer.forward

            def run(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():
                    return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                return _forward(*args, **kwargs)

            layer.forward = run
            patched.append((layer, original))
        yield
    finally:
        for layer, original in patched:
            if original is None:
                del layer.forward
            else:
                layer.forward = original


def _fit_max_length(
    composition: Composition, training: TrainingConfig, *, explicit: bool
) -> TrainingConfig:
    configs = {"anchor": composition.anchor.config, "specialist": composition.specialist.config}
    if explicit:
        problems = position_problems(configs, max_length=training.max_length)
        if problems:
            raise ConfigError("; ".join(problems))
        return training
    known = [p for p in map(positions_of, configs.values()) if p is not None]
    if known and min(known) < training.max_length:
        logger.info("training.max_length lowered to the models' %d positions", min(known))
        return dataclasses.replace(training, max_length=min(known))
    return training


# ---------------------------------------------------------------------------------------------
# The run


def _build_optimizer(
    bridge: nn.Module, config: TrainingConfig, device: torch.device
) -> torch.optim.Optimizer:
    decay = [p for p in bridge.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in bridge.parameters() if p.requires_grad and p.ndim < 2]  # norm gains
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    name = config.optimizer
    if name != "adamw" and device.type != "cuda":
        logger.warning(
            "training.optimizer %s needs a CUDA GPU (bitsandbytes); using adamw on %s instead",
            name,
            device,
        )
        name = "adamw"
    if name == "adamw":
        cls: type[torch.optim.Optimizer] = torch.optim.AdamW
    else:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    logger.info("optimizer: %s.%s", cls.__module__, cls.__name__)
    return cls(groups, lr=config.lr)


def _read_recipe(
    recipe: str | os.PathLike | Mapping[str, Any] | CompositionConfig,
    recipe_dir: str | os.PathLike | None,
) -> CompositionConfig:
    """The recipe with its relative paths resolved once: a file's against its own folder, a
    mapping's or config's against ``recipe_dir`` (default: the current folder)."""
    if isinstance(recipe, (str, os.PathLike)):
        return read_recipe(recipe)
    mapping = recipe.to_dict() if isinstance(recipe, CompositionConfig) else recipe
    return read_recipe(resolve_paths(mapping, base=Path(recipe_dir or Path.cwd())))


def read_training_settings(
    recipe: str | os.PathLike | Mapping[str, Any] | CompositionConfig,
    *,
    recipe_dir: str | os.PathLike | None = None,
) -> tuple[CompositionConfig, TrainingConfig, DataConfig]:
    """The recipe with its ``training`` and ``data`` sections validated.

    Relative data paths resolve against the recipe file's folder (``recipe_dir`` when the recipe
    is not a file, else the current folder).
    """
    config = _read_recipe(recipe, recipe_dir)
    training = TrainingConfig.from_mapping(config.training)
    return config, training, DataConfig.from_mapping(config.data)


def train(
    recipe: str | os.PathLike | Mapping[str, Any] | CompositionConfig,
    *,
    output_dir: str | os.PathLike,
    composition: Composition | None = None,
    stop_file: str | os.PathLike | None = None,
    recipe_dir: str | os.PathLike | None = None,
) -> Path:
    """Train the recipe's bridge into ``output_dir``; return the finished bridge folder.

    Resumes from the newest checkpoint in ``output_dir/checkpoints`` when there is one, and then
    ends with the same bridge as an uninterrupted run. ``composition`` (already loaded) skips
    loading the recipe's models. The run stops cleanly (checkpoint, status "stopped", raises
    :class:`TrainingStopped`) when ``stop_file`` (default ``output_dir/STOP``) appears or on
    SIGINT/SIGTERM. Bad settings or data raise ConfigError; running out of memory raises
    :class:`TrainingFailed` naming what to lower. Any failure is recorded in status.json (one
    line) and train.log (traceback).
    """
    from accelerate import Accelerator

    configure_cuda_allocator()  # before accelerate touches CUDA (no effect once it has)
    config, training, data = read_training_settings(recipe, recipe_dir=recipe_dir)
    output = Path(output_dir).resolve()
    cuda = torch.cuda.is_available()
    bf16 = resolve_bf16(
        training.bf16, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported()
    )
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if bf16 else "no",
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, not processes
    )
    main = accelerator.is_main_process
    run_guards.refuse_a_live_run(output)
    stop_path = Path(stop_file) if stop_file is not None else output / progress.STOP
    lock = None
    if main:
        _check_writable(output)
        lock = run_lock.inherited(output) or run_lock.acquire(output)
    known = None
    try:
        if main:  # before a line is logged or a status written: a refusal leaves no trace
            known = _run_identity(output, config, training, data)
            if known[2] and known[1] is not None:
                identity.refuse_other_identity(output, known[1], known[0])
        status_file = output / progress.STATUS
        status_before = status_file.read_bytes() if main and status_file.is_file() else None
        accelerator.wait_for_everyone()
        run = _Run(accelerator, config, training, data, output, stop_path)
        run.known_identity = known
        with (
            run_guards.log_to_file(output / progress.LOG if main else None),
            run_guards.StopRequest().installed() as stop,
            flushed_denormals(enabled=not cuda),
        ):
            try:
                return run.execute(composition, stop)
            except TrainingStopped:
                raise
            except BaseException as exc:
                failure = _failure(exc, run, output)
                reason = str(failure)
                if failure is exc and not isinstance(exc, ConfigError):
                    reason = (
                        f"{run_guards.one_line(exc)}; see {output / progress.LOG} for the traceback"
                    )
                # The caller gets the exception (the CLI prints it in one line); the log file
                # gets the reason and the traceback.
                run_guards.TRACEBACK.error(
                    "training failed: %s\n%s", reason, traceback.format_exc()
                )
                if main and isinstance(exc, identity.RunFolderMismatch):
                    if status_before is not None:  # the folder's own run is not failed
                        (output / progress.STATUS).write_bytes(status_before)
                elif main:
                    with contextlib.suppress(OSError):
                        run.write_status(progress.RunStatus.FAILED, reason=reason)
                if failure is exc:
                    raise
                raise failure from exc
            finally:
                run.release()
    finally:
        run_lock.release(lock)


def _run_identity(
    output: Path, config: CompositionConfig, training: TrainingConfig, data: DataConfig
) -> tuple[dict[str, Any], dict[str, Any] | None, bool]:
    """(this run's identity without weights, the folder's recorded one, whether the folder holds
    a run's state: a checkpoint or a finished bridge)."""
    current = identity.recipe_identity(
        config.to_dict(), training.to_dict(), dataclasses.asdict(data)
    )
    has_state = (
        progress.latest_checkpoint(output) is not None or (output / progress.BRIDGE).exists()
    )
    return current, identity.read_run_identity(output), has_state


def _check_writable(output: Path) -> None:
    """A clear message for a run folder that cannot be made or written (read-only, a file)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the run folder {output} ({exc.strerror or type(exc).__name__}); "
            "choose a folder you can write to (--output) or fix its permissions"
        ) from None


def _failure(exc: BaseException, run: _Run, output: Path) -> BaseException:
    """The exception a failed run ends with; its message is the status's one-line reason."""
    if run_guards.is_out_of_memory(exc):
        return TrainingFailed(run_guards.out_of_memory_reason(run.training, run.state.step))
    if isinstance(exc, run_guards.NonFiniteError):
        return TrainingFailed(f"{exc}; {_resume_hint(output)}")
    if isinstance(exc, KeyboardInterrupt):
        why = str(exc) or "interrupted"
        return run_guards.TrainingInterrupted(
            f"{why}, training ended at once; {_resume_hint(output)}"
        )
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, OSError) and exc.filename is not None:
        return TrainingFailed(
            f"could not write or read {exc.filename} ({exc.strerror or type(exc).__name__}); "
            "check the disk space and the folder's permissions, then run the same command again"
        )
    return exc


def _resume_hint(output: Path) -> str:
    """What can be resumed, read from the folder (never a checkpoint that is not there)."""
    found = progress.latest_checkpoint(output)
    if found is None:
        return "no checkpoint was written yet: running the same command again starts over"
    step, folder = found
    return f"run the same command again to resume from {folder} (step {step})"


@dataclass
class _Window:
    """Tokens seen since the last progress line, and when that window opened (for tokens/s)."""

    start: float
    tokens: int = 0


class _Run:
    """One training session (a driver: all decisions are the pure functions above)."""

    def __init__(
        self,
        accelerator: Accelerator,
        config: CompositionConfig,
        training: TrainingConfig,
        data: DataConfig,
        output: Path,
        stop_path: Path,
    ) -> None:
        self.accelerator = accelerator
        self.config = config
        self.training = training
        self.data = data
        self.output = output
        self.stop_path = stop_path
        self.main = accelerator.is_main_process
        self.state = checkpoints.RunState()  # the step, data position and loss window
        self.max_steps: int | None = None
        self.last_checkpoint: Path | None = None
        self.composition: Composition | None = None
        self.model: Any = None
        self.pad_id = 0
        # (identity without weights, the folder's recorded one, has state), read by train()
        self.known_identity: tuple[dict[str, Any], dict[str, Any] | None, bool] | None = None

    def write_status(self, state: progress.RunStatus, **fields: Any) -> None:
        progress.write_status(
            self.output,
            state,
            step=self.state.step,
            max_steps=self.max_steps,
            last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            **fields,
        )

    def release(self) -> None:
        """Undo accelerate's wrapping of a caller's composition and drop references."""
        if self.model is not None:
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        self.accelerator.free_memory()

    def execute(self, composition: Composition | None, stop: run_guards.StopRequest) -> Path:
        accelerator, training, data = self.accelerator, self.training, self.data
        device = accelerator.device
        if self.main:
            self.write_status(progress.RunStatus.RUNNING)
        train_path = data.require_train()
        run_identity, saved_identity, has_state = self.known_identity or _run_identity(
            self.output, self.config, training, data
        )
        # An explicit training.max_length beyond a model's positions is refused; the default
        # is lowered to the models' positions.
        explicit = "max_length" in self.config.training
        if composition is None:
            from composer.loading import load_composition
            from composer.pair_check import check_pair_configs

            check_pair_configs(self.config, max_length=training.max_length if explicit else None)
            composition = load_composition(self.config, device=device, seed=training.seed)
        training = self.training = _fit_max_length(composition, training, explicit=explicit)
        self.composition = composition
        run_identity["weights"] = {
            "anchor": identity.weights_fingerprint(composition.anchor),
            "specialist": identity.weights_fingerprint(composition.specialist),
        }
        if has_state and saved_identity is not None:
            identity.refuse_other_identity(self.output, saved_identity, run_identity)
        elif self.main:
            from composer.atomic import write_json_atomically

            write_json_atomically(self.output / identity.IDENTITY_FILE, run_identity)
        tokenizer = composition.tokenizer
        if tokenizer is None:
            raise ConfigError(
                "the composition has no tokenizer; compose it with tokenizer=... so the training "
                "files can be tokenized"
            )
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        split = load_dataset(
            train_path,
            tokenizer,
            max_length=training.max_length,
            eval_fraction=data.eval_fraction,
            eval_path=data.eval,
            seed=training.seed,
            columns=data.columns,
        )
        if data.format != "auto" and split.format != data.format:
            raise ConfigError(
                f"data.format is {data.format!r} but {train_path} holds {split.format} rows; "
                f"set data.format to {split.format!r} or auto, or pick the right file"
            )
        stream = BatchStream(split.train, training.batch_size, training.seed)
        max_steps = self.max_steps = training.total_steps(stream.batches_per_epoch)
        bridge = composition.bridge
        optimizer = _build_optimizer(bridge, training, device)
        from transformers import get_scheduler

        scheduler = get_scheduler(
            scheduler_name(training),
            optimizer,
            num_warmup_steps=training.warmup_for(max_steps),
            num_training_steps=max_steps,
        )
        self.model, optimizer, scheduler = accelerator.prepare(composition, optimizer, scheduler)
        model = self.model

        state = self.state = checkpoints.RunState(training=training.to_dict())
        found = progress.latest_checkpoint(self.output)
        if found is not None:
            step, folder = found
            try:
                saved = json.loads((folder / checkpoints.STATE).read_text(encoding="utf-8"))
                checkpoints.check_resumable(saved.get("training", {}), training, folder)
                state = checkpoints.load_checkpoint(
                    folder, bridge=bridge, optimizer=optimizer, scheduler=scheduler, device=device
                )
            except ConfigError:
                raise
            except Exception as exc:  # a damaged file: safetensors, pickle-free torch, JSON
                raise ConfigError(
                    f"the checkpoint {folder} is damaged ({type(exc).__name__}: "
                    f"{run_guards.one_line(exc).split(': ', 1)[-1]}); delete that folder to resume "
                    "from the checkpoint before it, or train into a new --output folder"
                ) from None
            state.training = training.to_dict()
            self.state = state
            self.last_checkpoint = folder
            logger.info("resuming from %s (step %d of %d)", folder, step, max_steps)
            if self.main:
                progress.truncate_progress(self.output, upto_step=state.step)
        elif self.main:
            (self.output / progress.PROGRESS).unlink(missing_ok=True)
        if self.main:
            self.stop_path.unlink(missing_ok=True)  # a stale request must not stop the new run
            self.write_status(progress.RunStatus.RUNNING)
        accelerator.wait_for_everyone()

        logger.info(
            "training %s bridge parameters for %d steps: %d train / %d eval examples, "
            "%d micro-batch(es) of %d per step, %d process(es), %s",
            f"{sum(p.numel() for p in bridge.parameters()):,}",
            max_steps,
            len(split.train),
            len(split.eval),
            training.grad_accum,
            training.batch_size,
            accelerator.num_processes,
            "bf16" if accelerator.mixed_precision == "bf16" else "fp32",
        )
        checkpointing = (
            gradient_checkpointing(checkpointed_anchor_layers(composition))
            if training.gradient_checkpointing
            else contextlib.nullcontext()
        )
        self.pad_id = pad_id
        with checkpointing:
            self._loop(model, optimizer, scheduler, stream, split, state, stop, pad_id)

        if self.main:
            bridge_dir = self.output / progress.BRIDGE
            composition.save_bridge(str(bridge_dir))
            self.write_status(progress.RunStatus.FINISHED, bridge=str(bridge_dir))
        accelerator.wait_for_everyone()
        logger.info("finished: bridge in %s", self.output / progress.BRIDGE)
        return self.output / progress.BRIDGE

    def _loop(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        stream: BatchStream,
        split: Any,
        state: checkpoints.RunState,
        stop: run_guards.StopRequest,
        pad_id: int,
    ) -> None:
        """Steps until max_steps: stop requests, one optimizer step, eval, logging, checkpoints."""
        accelerator, training = self.accelerator, self.training
        assert self.composition is not None and self.max_steps is not None
        bridge, max_steps = self.composition.bridge, self.max_steps
        session_start, session_steps = time.perf_counter(), 0
        if state.step == 0 and split.eval and state.start_eval_loss is None:
            state.start_eval_loss = self._evaluate(split.eval, pad_id)
            logger.info("eval loss before training (the anchor alone): %.4f", state.start_eval_loss)
        window = _Window(start=time.perf_counter())
        pacer = Pacer(total=max_steps - state.step)
        pacer.due(0)  # the clock starts now; the first line is due 10 s from here
        model.train()
        while state.step < max_steps:
            if stop.requested or (self.main and self.stop_path.exists()):
                accelerator.set_trigger()
            if accelerator.check_trigger():
                self._stop(bridge, optimizer, scheduler, state, session_start, stop)
            step_loss = self._optimizer_step(model, optimizer, scheduler, stream, state, window)
            session_steps += 1

            step = state.step
            last = step == max_steps
            evaluate = last or (training.eval_every and step % training.eval_every == 0)
            eval_loss = self._evaluate(split.eval, pad_id) if evaluate and split.eval else None
            if last or step % training.logging_every == 0 or eval_loss is not None:
                self._log(scheduler, stream, state, window, eval_loss, session_start, session_steps)
            elif self.main and pacer.due(session_steps):
                # between logged steps, a line at least every 10 s (progress.jsonl unchanged)
                left = eta_seconds(session_steps, pacer.total, time.perf_counter() - session_start)
                logger.info(
                    "step %d/%d loss %.4f ETA %s", step, max_steps, step_loss, format_duration(left)
                )
            if last or step % training.save_every == 0:
                self._checkpoint(bridge, optimizer, scheduler, state, session_start)

    def _optimizer_step(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        stream: BatchStream,
        state: checkpoints.RunState,
        window: _Window,
    ) -> float:
        """One optimizer step over ``grad_accum`` global micro-batches; returns its loss (the mean
        over every loss token of the global batch, whatever the number of processes)."""
        accelerator, training, pad_id = self.accelerator, self.training, self.pad_id
        assert self.composition is not None
        device, examples = accelerator.device, stream.examples
        rank, world = accelerator.process_index, accelerator.num_processes
        params = [p for p in self.composition.bridge.parameters() if p.requires_grad]
        micro = [stream.micro_batch(state.micro_batches + k) for k in range(training.grad_accum)]
        total_tokens = sum(loss_tokens(examples[i]) for batch in micro for i in batch)
        window.tokens += sum(len(examples[i].input_ids) for batch in micro for i in batch)
        local_sum = torch.zeros((), device=device)
        for k, indices in enumerate(micro):
            mine = shard(indices, rank=rank, world_size=world)
            weight = 1.0
            if not mine:  # every process must run backward for DDP; this one adds nothing
                mine, weight = indices[:1], 0.0
            batch = collate([examples[i] for i in mine], pad_token_id=pad_id)
            batch = {name: t.to(device) for name, t in batch.items()}
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            sync = k == len(micro) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                out = model(**batch)
                token_sum = out.loss.float() * count * weight  # (), summed over loss tokens
                # DDP averages gradients over processes: scale so they add up instead.
                accelerator.backward(token_sum * world / max(total_tokens, 1))
            local_sum += token_sum.detach()
        step_loss = float(accelerator.reduce(local_sum, reduction="sum")) / max(total_tokens, 1)
        if training.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(params, training.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )
        run_guards.check_finite(step_loss, float(grad_norm), step=state.step + 1, config=training)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.micro_batches += training.grad_accum
        state.loss_sum += step_loss
        state.loss_steps += 1
        return step_loss

    def _log(
        self,
        scheduler: Any,
        stream: BatchStream,
        state: checkpoints.RunState,
        window: _Window,
        eval_loss: float | None,
        session_start: float,
        session_steps: int,
    ) -> None:
        """A progress.jsonl line and a log line for the steps since the last one."""
        assert self.max_steps is not None
        step, max_steps = state.step, self.max_steps
        now = time.perf_counter()
        record = {
            "step": step,
            "max_steps": max_steps,
            "epoch": round(stream.epoch_at(state.micro_batches), 4),
            "loss": state.loss_sum / state.loss_steps,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_second": window.tokens / max(now - window.start, 1e-9),
            "elapsed_s": round(state.elapsed_s + now - session_start, 3),
            "eta_s": round((max_steps - step) * (now - session_start) / session_steps, 3),
            "peak_memory_bytes": run_guards.peak_memory_bytes(self.accelerator.device),
        }
        if eval_loss is not None:
            record["eval_loss"] = eval_loss
            record["start_eval_loss"] = state.start_eval_loss
        if self.main:
            progress.append_progress(self.output, record)
        logger.info(
            "step %d/%d loss %.4f%s lr %.2e %.0f tok/s ETA %s",
            step,
            max_steps,
            record["loss"],
            f" eval {eval_loss:.4f}" if eval_loss is not None else "",
            record["lr"],
            record["tokens_per_second"],
            format_duration(record["eta_s"]),
        )
        state.loss_sum, state.loss_steps = 0.0, 0
        window.start, window.tokens = time.perf_counter(), 0

    def _checkpoint(
        self,
        bridge: nn.Module,
        optimizer: Any,
        scheduler: Any,
        state: checkpoints.RunState,
        start: float,
    ) -> Path:
        bad = [n for n, p in bridge.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:  # a checkpoint must never replace a finite one with a non-finite bridge
            raise run_guards.NonFiniteError(
                f"non-finite bridge weights after step {state.step} ({bad[0]})"
            )
        saved = dataclasses.replace(state, elapsed_s=state.elapsed_s + time.perf_counter() - start)
        folder = self.output / progress.CHECKPOINTS / f"step-{state.step}"
        if self.main:
            folder = checkpoints.save_checkpoint(
                self.output,
                bridge=bridge,
                optimizer=optimizer,
                scheduler=scheduler,
                state=saved,
                keep=self.training.keep_checkpoints,
            )
            self.last_checkpoint = folder
            self.write_status(progress.RunStatus.RUNNING)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = folder
        return folder

    def _stop(
        self,
        bridge: nn.Module,
        optimizer: Any,
        scheduler: Any,
        state: checkpoints.RunState,
        start: float,
        stop: run_guards.StopRequest,
    ) -> None:
        why = stop.reason or f"{self.stop_path} found"
        logger.warning("stopping at step %d (%s): writing a checkpoint", state.step, why)
        if self.main:
            self.write_status(progress.RunStatus.STOPPING)
        folder = self._checkpoint(bridge, optimizer, scheduler, state, start)
        if self.main:
            self.stop_path.unlink(missing_ok=True)
            self.write_status(
                progress.RunStatus.STOPPED, reason=f"stopped at step {state.step} ({why})"
            )
        raise TrainingStopped(state.step, folder)

    @torch.no_grad()
    def _evaluate(self, examples: Sequence[Example], pad_id: int) -> float:
        """Mean loss per loss token over the eval set (each process scores its share)."""
        accelerator = self.accelerator
        assert self.composition is not None
        composition = accelerator.unwrap_model(self.model)  # no DDP forward for no-grad passes
        device = accelerator.device
        batches = length_grouped_batches(
            examples, batch_size=self.training.batch_size, seed=0, shuffle=False
        )
        totals = torch.zeros(2, device=device, dtype=torch.float64)  # (loss sum, tokens)
        composition.eval()
        try:
            mine = shard(
                batches, rank=accelerator.process_index, world_size=accelerator.num_processes
            )
            for indices in mine:
                batch = collate([examples[i] for i in indices], pad_token_id=pad_id)
                batch = {name: t.to(device) for name, t in batch.items()}
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                totals[0] += float(composition(**batch).loss) * count
                totals[1] += count
        finally:
            composition.train()
        totals = accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1].clamp(min=1))
