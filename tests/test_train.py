"""Training a bridge end to end on pico models saved to disk and loaded through the recipe path."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from composer import progress
from composer.chartok import build_char_tokenizer
from composer.composition import Composition, compose
from composer.config import BridgeConfig, ConfigError, read_recipe, resolve_paths
from composer.data import encode
from composer.memory import plan
from composer.train import (
    TrainingFailed,
    TrainingStopped,
    checkpointed_anchor_layers,
    gradient_checkpointing,
    train,
)
from composer.training_config import DataConfig, TrainingConfig
from tests.conftest import randomize_bridge

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "train_helper.py"
VENV_BIN = Path(sys.executable).parent
STEPS = 20
TRAINING = {
    "max_steps": STEPS,
    "batch_size": 4,
    "lr": 1e-2,
    "warmup_steps": 2,
    "save_every": 5,
    "logging_every": 2,
    "keep_checkpoints": 2,
}


def _pico_common() -> dict:
    return dict(
        vocab_size=100,  # the character tokenizer has 100 tokens
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _anchor() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, **_pico_common()
    )
    return LlamaForCausalLM(config)


def _specialist() -> Qwen2ForCausalLM:
    torch.manual_seed(1)
    config = Qwen2Config(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, **_pico_common()
    )
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Pico models gain nothing from threads, and spinning threads slow a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Pico anchor and specialist saved as Hugging Face folders with a character tokenizer,
    plus a small key=value data file; the recipe loading path reads them like real models."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = build_char_tokenizer()
    for name, model in (("anchor", _anchor()), ("specialist", _specialist())):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        key = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        rows.append({"text": f"{key}={rng.randint(1, 99)};"})
    _write_jsonl(root / "train.jsonl", rows)
    return root


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _recipe(models: Path, folder: Path, *, data: dict | None = None, **training) -> Path:
    """A recipe file in ``folder`` whose data path is relative to it (resolved by train)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text((models / "train.jsonl").read_text())
    recipe = {
        "anchor": {"model": str(models / "anchor")},
        "specialist": {"model": str(models / "specialist")},
        "bridge": {"every": 2},
        "training": {**TRAINING, **training},
        "data": data or {"train": "train.jsonl", "eval_fraction": 0.125},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _bridge(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "bridge.safetensors"))


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"bridges differ by {worst}"


def _check_progress(output: Path, max_steps: int) -> list[dict]:
    lines = (output / progress.PROGRESS).read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps not strictly increasing: {steps}"
    for record in records:
        assert set(progress.PROGRESS_KEYS) <= record.keys()
        assert record["max_steps"] == max_steps
        assert all(isinstance(record[k], (int, float)) for k in progress.PROGRESS_KEYS)
    assert steps[-1] == max_steps and "eval_loss" in records[-1]
    return records


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> Path:
    """An uninterrupted run of the default recipe."""
    root = tmp_path_factory.mktemp("reference")
    bridge = train(_recipe(models, root), output_dir=root / "out")
    assert bridge == root / "out" / "bridge"
    return root / "out"


def test_loss_falls_when_overfitting(models, tmp_path):
    rows = [json.loads(line) for line in (models / "train.jsonl").read_text().splitlines()][:4]
    _write_jsonl(tmp_path / "tiny.jsonl", rows)
    recipe = _recipe(
        models,
        tmp_path,
        data={"train": "tiny.jsonl"},
        max_steps=30,
        lr=3e-2,
        logging_every=1,
        schedule="constant",
    )
    train(recipe, output_dir=tmp_path / "out")
    losses = [r["loss"] for r in progress.read_progress(tmp_path / "out")]
    assert len(losses) == 30
    # The pico anchor's random 0.02-scale output head caps how confident logits can get, so
    # even a perfect fit stays far above 0; from ln(100) = 4.6 the bridge reaches about 3.9.
    assert sum(losses[-5:]) / 5 < losses[0] - 0.4, losses
    assert sum(losses[-5:]) < sum(losses[5:10]) < sum(losses[:5]), losses
    status = progress.read_status(tmp_path / "out")
    assert status["state"] == "finished" and status["step"] == 30


def test_run_writes_status_progress_checkpoints_and_bridge(reference):
    status = progress.read_status(reference)
    assert status["state"] == "finished"
    assert status["pid"] == os.getpid()
    assert status["bridge"] == str(reference / "bridge")
    assert Path(status["last_checkpoint"]) == reference / "checkpoints" / f"step-{STEPS}"
    # keep_checkpoints=2: only the newest two remain, and no temporary folder
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step-15", "step-20"]
    checkpoint = reference / "checkpoints" / f"step-{STEPS}"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == [
        "bridge.safetensors",
        "optimizer.pt",
        "rng.safetensors",
        "scheduler.json",
        "trainer_state.json",
    ]
    torch.load(checkpoint / "optimizer.pt", weights_only=True)  # no pickle of arbitrary objects
    records = _check_progress(reference, STEPS)
    assert [r["step"] for r in records] == list(range(2, STEPS + 1, 2))
    assert records[0]["lr"] == pytest.approx(1e-2)  # warmup of 2 steps done
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to zero
    # the exported bridge is the last checkpoint's
    _assert_close(_bridge(reference / "bridge"), _bridge(checkpoint), atol=0)
    assert "step 20/20" in (reference / progress.LOG).read_text()


def _start_slow_run(recipe: Path, output: Path) -> subprocess.Popen:
    """A training process (0.15 s per step) that a test can signal or kill mid-run."""
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(recipe), str(output), "--slow", "0.15"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for_first_checkpoint(job: subprocess.Popen, output: Path) -> None:
    deadline = time.monotonic() + 90
    while not (output / "checkpoints" / "step-5").is_dir():
        assert job.poll() is None, "the training process ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)


def test_sigkill_then_rerun_equals_uninterrupted_run(models, reference, tmp_path):
    recipe = _recipe(models, tmp_path)
    output = tmp_path / "out"
    job = _start_slow_run(recipe, output)
    try:
        _wait_for_first_checkpoint(job, output)
        time.sleep(0.4)  # a few steps past the checkpoint, with progress lines after it
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == -signal.SIGKILL
    killed_at = progress.read_status(output)
    assert killed_at["state"] == "running"  # nobody could write anything else
    assert (output / "checkpoints" / "step-5").is_dir()
    assert not (output / "bridge").exists()

    train(recipe, output_dir=output)  # the same command again resumes

    _assert_close(_bridge(output / "bridge"), _bridge(reference / "bridge"), atol=1e-5)
    resumed = _check_progress(output, STEPS)
    uninterrupted = progress.read_progress(reference)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):  # the same loss curve
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert resumed[-1]["elapsed_s"] >= resumed[0]["elapsed_s"]


def _stop_at_forward(monkeypatch, n: int, action) -> None:  # noqa: ANN001
    forward = Composition.forward
    calls = {"n": 0}

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self.training:  # the n-th training step's forward; eval passes run in eval mode
            calls["n"] += 1
            if calls["n"] == n:
                action()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Composition, "forward", counting)


def test_stop_file_checkpoints_and_the_rerun_finishes_the_same(
    models, reference, tmp_path, monkeypatch
):
    recipe = _recipe(models, tmp_path)
    output = tmp_path / "out"
    _stop_at_forward(monkeypatch, 7, lambda: (output / progress.STOP).touch())
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, output_dir=output)
    assert stopped.value.step == 7
    assert stopped.value.checkpoint == output / "checkpoints" / "step-7"
    status = progress.read_status(output)
    assert status["state"] == "stopped" and status["step"] == 7
    assert status["last_checkpoint"] == str(output / "checkpoints" / "step-7")
    assert not (output / progress.STOP).exists()  # consumed: the rerun is not stopped by it
    assert not (output / "bridge").exists()
    monkeypatch.undo()
    train(recipe, output_dir=output)
    _assert_close(_bridge(output / "bridge"), _bridge(reference / "bridge"), atol=1e-5)
    _check_progress(output, STEPS)


def test_sigint_stops_cleanly(models, tmp_path, monkeypatch):
    recipe = _recipe(models, tmp_path, max_steps=8)
    output = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)
    _stop_at_forward(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, output_dir=output)
    assert stopped.value.step == 3
    assert "SIGINT" in progress.read_status(output)["reason"]
    assert signal.getsignal(signal.SIGINT) == before  # the run's handler was removed again


def test_bad_rows_are_skipped_and_reported(models, tmp_path):
    rows = [json.loads(line) for line in (models / "train.jsonl").read_text().splitlines()]
    rows[1] = {"text": ""}
    rows[4] = {"txt": "a=1"}
    _write_jsonl(tmp_path / "mixed.jsonl", rows)
    recipe = _recipe(models, tmp_path, data={"train": "mixed.jsonl"}, max_steps=2)
    train(recipe, output_dir=tmp_path / "out")
    log = (tmp_path / "out" / progress.LOG).read_text()
    assert "mixed.jsonl, row 2: 'text' is empty" in log
    assert "mixed.jsonl, row 5: missing 'text'" in log


def test_empty_data_fails_with_the_promised_message(models, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    recipe = _recipe(models, tmp_path, data={"train": "empty.jsonl"})
    with pytest.raises(ConfigError, match="has no examples"):
        train(recipe, output_dir=tmp_path / "out")
    status = progress.read_status(tmp_path / "out")
    assert status["state"] == "failed"
    assert "empty.jsonl has no examples" in status["reason"]
    assert "\n" not in status["reason"]


def test_missing_data_section_names_the_fix(models, tmp_path):
    recipe = _recipe(models, tmp_path, data={"eval_fraction": 0.0})
    with pytest.raises(ConfigError, match="data.train"):
        train(recipe, output_dir=tmp_path / "out")


def test_out_of_memory_names_what_to_lower(models, tmp_path, monkeypatch):
    def oom() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _stop_at_forward(monkeypatch, 2, oom)
    recipe = _recipe(models, tmp_path)
    with pytest.raises(TrainingFailed) as failed:
        train(recipe, output_dir=tmp_path / "out")
    message = str(failed.value)
    for hint in ("batch_size", "max_length", "gradient_checkpointing"):
        assert hint in message
    status = progress.read_status(tmp_path / "out")
    assert status["state"] == "failed" and status["reason"] == message


def test_other_errors_fail_with_one_line_and_a_logged_traceback(models, tmp_path, monkeypatch):
    def boom() -> None:
        raise RuntimeError("boom\nsecond line")

    _stop_at_forward(monkeypatch, 2, boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(_recipe(models, tmp_path), output_dir=tmp_path / "out")
    status = progress.read_status(tmp_path / "out")
    assert status["state"] == "failed"
    assert status["reason"].startswith("RuntimeError: boom; see ")
    assert "Traceback" in (tmp_path / "out" / progress.LOG).read_text()


def test_changed_batch_size_refuses_to_resume(models, reference, tmp_path):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(reference, output)
    with pytest.raises(ConfigError, match="training.batch_size=4"):
        train(_recipe(models, tmp_path, batch_size=8), output_dir=output)


def test_two_processes_match_one_process(models, tmp_path):
    settings = {"max_steps": 4, "grad_accum": 2, "save_every": 2, "batch_size": 4}
    one = _recipe(models, tmp_path / "one", **settings)
    two = _recipe(models, tmp_path / "two", **settings)
    train(one, output_dir=tmp_path / "one" / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            str(VENV_BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            str(HELPER),
            str(two),
            str(tmp_path / "two" / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "two" / "out" / progress.LOG).read_text()
    _assert_close(
        _bridge(tmp_path / "two" / "out" / "bridge"),
        _bridge(tmp_path / "one" / "out" / "bridge"),
        atol=1e-4,
    )
    a = progress.read_progress(tmp_path / "one" / "out")
    b = progress.read_progress(tmp_path / "two" / "out")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
        assert x.get("eval_loss") == pytest.approx(y.get("eval_loss"), abs=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    composition = compose(_anchor(), _specialist(), bridge_config=BridgeConfig(every=2))
    randomize_bridge(composition, scale=0.1)
    ids = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    layers = checkpointed_anchor_layers(composition)
    assert len(layers) == 2  # anchor layers 2 and 3 (the lowest connected layer is 1)
    calls = []
    handle = layers[-1].self_attn.register_forward_hook(lambda *_: calls.append(1))

    def grads() -> dict[str, torch.Tensor]:
        composition.bridge.zero_grad(set_to_none=True)
        composition(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in composition.bridge.named_parameters()}

    try:
        plain = grads()
        assert len(calls) == 1
        with gradient_checkpointing(layers):
            checkpointed = grads()
        assert len(calls) == 3  # forward + recomputation in backward: checkpointing acted
        again = grads()
        assert len(calls) == 4  # restored on exit
    finally:
        handle.remove()
    assert all(g.abs().max() > 0 for g in plain.values())
    _assert_close(checkpointed, plain, atol=1e-6)
    _assert_close(again, plain, atol=0)


def test_gradient_checkpointing_run_matches(models, reference, tmp_path):
    recipe = _recipe(models, tmp_path, gradient_checkpointing=True)
    train(recipe, output_dir=tmp_path / "out")
    _assert_close(_bridge(tmp_path / "out" / "bridge"), _bridge(reference / "bridge"), atol=1e-5)


def test_training_config_messages_name_field_value_and_fix():
    with pytest.raises(ConfigError, match=r"training.batch_size is 0; expected a whole number"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"training.schedule is 'step'; expected one of cosine"):
        TrainingConfig(schedule="step")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        TrainingConfig.from_mapping({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="training.bf16 is 'yes'"):
        TrainingConfig(bf16="yes")
    with pytest.raises(ConfigError, match="drop one of them"):
        DataConfig(train="a.jsonl", eval="b.jsonl", eval_fraction=0.1)
    assert TrainingConfig(max_steps=None, epochs=2, grad_accum=2).total_steps(7) == 7
    assert TrainingConfig(max_steps=5).total_steps(100) == 5
    data = {"train": "d/t.jsonl", "eval": "/abs/e.jsonl"}
    resolved = resolve_paths({"data": data}, base=Path("/r"))
    assert resolved["data"] == {"train": "/r/d/t.jsonl", "eval": "/abs/e.jsonl"}


def test_plan_scales_sensibly(models, tmp_path):
    def total(**changes) -> tuple[int, dict]:
        recipe = read_recipe(yaml.safe_load(_recipe(models, tmp_path).read_text()))
        data = recipe.to_dict()
        for key, value in changes.items():
            section, name = key.split("__")
            data[section] = {**data[section], name: value}
        result = plan(data)
        return result.total_bytes, {name: size for name, size, _ in result.components}

    base, parts = total(training__max_length=128)
    bigger_batch, _ = total(training__max_length=128, training__batch_size=16)
    longer, _ = total(training__max_length=256)
    _, checkpointed = total(training__max_length=128, training__gradient_checkpointing=True)
    _, nf4 = total(training__max_length=128, anchor__quantization="nf4")
    assert bigger_batch > base and longer > base
    assert checkpointed["anchor activations"] < parts["anchor activations"]
    assert nf4["anchor weights"] < parts["anchor weights"]
    assert parts["bridge + grads + optimizer"] == 39_136 * 16  # fp32 weights, grads, 2 moments
    lines = plan(read_recipe(yaml.safe_load(_recipe(models, tmp_path).read_text()))).format()
    assert any(line.startswith("fits in ") for line in lines)


def test_cuda_allocator_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    from composer.hardware import (
        ALLOCATOR_ENV,
        DEFAULT_CUDA_ALLOCATOR,
        allocator_setting,
        configure_cuda_allocator,
    )

    assert allocator_setting({}) == DEFAULT_CUDA_ALLOCATOR == "expandable_segments:True"
    for name in ALLOCATOR_ENV:
        assert allocator_setting({name: "max_split_size_mb:128"}) is None
    for name in ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not configure_cuda_allocator() and ALLOCATOR_ENV[0] not in os.environ  # too late
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert configure_cuda_allocator() and os.environ[ALLOCATOR_ENV[0]] == DEFAULT_CUDA_ALLOCATOR
    monkeypatch.setenv(ALLOCATOR_ENV[0], "max_split_size_mb:128")
    assert not configure_cuda_allocator()
    assert os.environ[ALLOCATOR_ENV[0]] == "max_split_size_mb:128"  # the user's choice stays


def test_a_given_composition_is_trained_in_place(models, tmp_path):
    from composer.loading import load_composition

    recipe = _recipe(models, tmp_path, max_steps=3, optimizer="adamw_8bit")
    composition = load_composition(recipe, seed=0)
    before = {k: v.clone() for k, v in composition.bridge.state_dict().items()}
    bridge = train(recipe, output_dir=tmp_path / "out", composition=composition)
    after = {k: v.detach() for k, v in composition.bridge.state_dict().items()}
    _assert_close(_bridge(bridge), after, atol=0)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the 8-bit optimizers need CUDA: on a CPU the run says so and uses adamw
    assert (
        torch.cuda.is_available() or "using adamw" in (tmp_path / "out" / progress.LOG).read_text()
    )


def test_declared_format_must_match_the_file(models, tmp_path):
    recipe = _recipe(models, tmp_path, data={"train": "train.jsonl", "format": "messages"})
    with pytest.raises(ConfigError, match="holds text rows; set data.format to 'text'"):
        train(recipe, output_dir=tmp_path / "out")


def test_a_live_run_in_the_same_folder_is_refused(models, tmp_path):
    output = tmp_path / "out"
    progress.write_status(output, "running")
    status = json.loads((output / progress.STATUS).read_text())
    status["pid"] = os.getppid()  # a process that is alive and is not this one
    (output / progress.STATUS).write_text(json.dumps(status))
    with pytest.raises(ConfigError, match=f"another training run \\(pid {os.getppid()}\\)"):
        train(_recipe(models, tmp_path), output_dir=output)


def test_sigterm_to_a_training_process_checkpoints_and_exits_cleanly(models, tmp_path):
    recipe = _recipe(models, tmp_path)
    output = tmp_path / "out"
    job = _start_slow_run(recipe, output)
    try:
        _wait_for_first_checkpoint(job, output)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 3  # the helper's code for TrainingStopped
    finally:
        if job.poll() is None:
            job.kill()
    status = progress.read_status(output)
    assert status["state"] == "stopped" and "SIGTERM" in status["reason"]
    assert Path(status["last_checkpoint"]) == output / "checkpoints" / f"step-{status['step']}"
    assert Path(status["last_checkpoint"]).is_dir() and status["step"] < STEPS


def test_start_eval_loss_is_the_anchor_alone(models, tmp_path):
    """The "before" every eval line carries is the anchor's own loss on the eval set."""
    out = tmp_path / "out"
    recipe = _recipe(
        models, tmp_path, data={"train": "train.jsonl", "eval": "train.jsonl"}, max_steps=3
    )
    train(recipe, output_dir=out)
    records = [r for r in progress.read_progress(out) if "eval_loss" in r]
    assert records and {r["start_eval_loss"] for r in records} == {records[0]["start_eval_loss"]}

    anchor = LlamaForCausalLM.from_pretrained(models / "anchor").eval()
    tokenizer = build_char_tokenizer()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in (models / "train.jsonl").read_text().splitlines():
            example = encode(json.loads(line), "text", tokenizer, max_length=512)
            ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
            n = int((labels != -100).sum())
            total += float(anchor(input_ids=ids, labels=labels).loss) * n
            count += n
    assert records[0]["start_eval_loss"] == pytest.approx(total / count, rel=1e-4)
    assert records[-1]["eval_loss"] != pytest.approx(records[0]["start_eval_loss"], rel=1e-6)
