"""Bad inputs at every door (CLI, Python API, app handlers, the app's HTTP API): each class of
mistake gets a message naming the value, what was expected and the fix, never a traceback or a
silent acceptance, and the user's files are left as they were.

Classes (the closing list of the hardening issue, each with its tests below):
- malformed files: GGUF, safetensors, JSON configs, YAML recipes, data files, archives
- bridges: tensors of the wrong dtype/shape or non-finite; a bridge made for other weights
- pairs: vocabulary, widths/heads, positions vs training.max_length, decided from configs
- training state: non-finite loss, a run folder of another recipe/data/models, two processes on
  one folder, a second SIGTERM, an output folder that cannot be written
- sizes: a row, a prompt or an archive far beyond its bound (bounded memory)
- endpoints: wrong types and folders outside the allowed roots
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from composer import progress, run_lock
from composer.chartok import build_char_tokenizer
from composer.cli import main
from composer.config import ConfigError, ModelSpec
from composer.loading import load_composition, load_config

REPO = Path(__file__).resolve().parents[1]
TRAINING = {
    "max_steps": 6,
    "batch_size": 4,
    "lr": 1e-2,
    "warmup_steps": 1,
    "save_every": 2,
    "logging_every": 1,
    "keep_checkpoints": 2,
    "max_length": 48,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _common(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _llama(seed: int, vocab_size: int = 100) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, **_common(vocab_size)
    )
    return LlamaForCausalLM(config)


def _qwen2(seed: int, vocab_size: int = 100) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, **_common(vocab_size)
    )
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Model folders: an anchor, its twin (same shape, other weights), a specialist, and a
    specialist with another tokenizer and vocabulary; a small key=value data file."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tokenizer = build_char_tokenizer()
    other_tokenizer = build_char_tokenizer("abcdefghij=;0123456789")
    for name, model, tok in (
        ("anchor", _llama(0), tokenizer),
        ("anchor-twin", _llama(7), tokenizer),
        ("specialist", _qwen2(1), tokenizer),
        ("specialist-other-vocab", _qwen2(1, vocab_size=len(other_tokenizer)), other_tokenizer),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rng = random.Random(0)
    rows = [
        {"text": f"{''.join(rng.choice('abcdefgh') for _ in range(3))}={rng.randint(1, 99)};"}
        for _ in range(24)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def recipe_file(world: Path, folder: Path, **changes) -> Path:
    """A recipe in ``folder`` over the world's models; ``changes`` replace whole sections."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "anchor": {"model": str(world / "anchor")},
        "specialist": {"model": str(world / "specialist")},
        "bridge": {"every": 2, "num_heads": 2, "head_dim": 16},
        "generation": {"max_new_tokens": 4},
        "training": dict(TRAINING),
        "data": {"train": str(world / "train.jsonl")},
    }
    recipe.update(changes)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (to show a failed command changed nothing)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def cli(*args: str, capsys) -> tuple[int, str]:
    """The CLI in this process: (exit status, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def cli_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (its own process: no pytest handlers hide a traceback)."""
    return subprocess.run(
        [sys.executable, "-m", "composer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("calm-composer:")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> Path:
    """A finished run of the default recipe (its folder: checkpoints, bridge, identity)."""
    from composer.train import train

    root = tmp_path_factory.mktemp("trained")
    train(recipe_file(world, root), output_dir=root / "run")
    return root / "run"


# ---------------------------------------------------------------------------------------------
# Malformed files: GGUF, safetensors, JSON configs, YAML, data files, archives


def _gguf(path: Path) -> bytes:
    """A small valid GGUF (llama metadata, one tensor) written with the gguf package."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}".encode() for i in range(10)])
    writer.add_token_scores([0.0] * 10)
    writer.add_token_types([1] * 10)
    writer.add_tensor("token_embd.weight", np.zeros((10, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("cut", ["garbage", "header", "half", "tensor_data"])
def test_malformed_gguf_is_named_api(tmp_path, cut):
    data = _gguf(tmp_path / "whole.gguf")
    blob = {
        "garbage": b"not a model at all" * 8,
        "header": data[:40],
        "half": data[: len(data) // 2],
        "tensor_data": data[:-100],
    }[cut]
    path = tmp_path / f"{cut}.gguf"
    path.write_bytes(blob)
    with pytest.raises(ConfigError, match="GGUF file is malformed or truncated"):
        load_config(ModelSpec(model=str(path)))
    assert path.read_bytes() == blob


def test_malformed_gguf_is_named_cli(world, tmp_path, capsys):
    data = _gguf(tmp_path / "whole.gguf")
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    recipe = recipe_file(world, tmp_path, anchor={"model": str(tmp_path / "cut.gguf")})
    before = snapshot(tmp_path)
    code, err = cli("info", str(recipe), capsys=capsys)
    assert code == 2
    assert "cut.gguf" in one_error_line(err) and "malformed or truncated" in err
    assert snapshot(tmp_path) == before


def test_malformed_model_config_json(world, tmp_path, capsys):
    import shutil

    folder = tmp_path / "broken-model"
    shutil.copytree(world / "anchor", folder)
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    recipe = recipe_file(world, tmp_path, anchor={"model": str(folder)})
    code, err = cli("info", str(recipe), capsys=capsys)
    assert code == 2 and "could not read the config of" in one_error_line(err)
    assert "broken-model" in err


def test_malformed_tokenizer_file(world, tmp_path, capsys):
    import shutil

    folder = tmp_path / "broken-tokenizer"
    shutil.copytree(world / "anchor", folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    recipe = recipe_file(world, tmp_path, anchor={"model": str(folder)})
    with pytest.raises(ConfigError, match="broken-tokenizer"):
        load_composition(recipe)
    code, err = cli("generate", str(recipe), "--prompt", "ab=", capsys=capsys)
    assert code == 2 and "tokenizer" in one_error_line(err)


@pytest.mark.parametrize("damage", ["state", "weights"])
def test_a_damaged_checkpoint_is_named(world, trained, tmp_path, damage, capsys):
    import shutil

    from composer.train import train

    output = _copy_run(trained, tmp_path / "run")
    shutil.rmtree(output / "bridge")  # unfinished: resuming reads the newest checkpoint
    step, folder = progress.latest_checkpoint(output)
    name = "trainer_state.json" if damage == "state" else "bridge.safetensors"
    (folder / name).write_bytes((folder / name).read_bytes()[:-30])
    before = snapshot(folder)
    recipe = recipe_file(world, tmp_path)
    with pytest.raises(ConfigError, match=f"the checkpoint {re.escape(str(folder))} is damaged"):
        train(recipe, output_dir=output)
    code, err = cli("train", str(recipe), "--output", str(output), capsys=capsys)
    assert code == 2 and "delete that folder to resume" in one_error_line(err)
    assert snapshot(folder) == before


def test_malformed_yaml_recipe(tmp_path, capsys):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("anchor: {model: [unclosed\n")
    code, err = cli("info", str(bad), capsys=capsys)
    assert code == 2 and str(bad) in one_error_line(err)


def _damage_weights(bridge: Path, how: str) -> None:
    path = bridge / "bridge.safetensors"
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-50])  # the header promises bytes that are gone
        return
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    if how == "nan":
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    elif how == "integer":
        tensors[name] = tensors[name].to(torch.int32)
    elif how == "shape":
        tensors[name] = torch.zeros(3, 5)
    save_file(tensors, str(path))


BRIDGE_DAMAGE = {
    "truncated": "not a readable safetensors file",
    "nan": "NaN or infinite values",
    "integer": "holds int32 values; expected floating point",
    "shape": "has shape (3, 5)",
}


@pytest.mark.parametrize("how", sorted(BRIDGE_DAMAGE))
def test_damaged_bridge_is_refused_api(world, trained, tmp_path, how):
    import shutil

    bridge = tmp_path / "bridge"
    shutil.copytree(trained / "bridge", bridge)
    _damage_weights(bridge, how)
    before = snapshot(bridge)
    recipe = recipe_file(world, tmp_path / "r")
    with pytest.raises(ConfigError, match=re.escape(BRIDGE_DAMAGE[how])):
        load_composition(recipe, bridge=bridge)
    assert snapshot(bridge) == before


def test_damaged_bridge_is_refused_cli(world, trained, tmp_path, capsys):
    import shutil

    bridge = tmp_path / "bridge"
    shutil.copytree(trained / "bridge", bridge)
    _damage_weights(bridge, "nan")
    recipe = recipe_file(world, tmp_path / "r")
    code, err = cli(
        "generate", str(recipe), "--bridge", str(bridge), "--prompt", "ab=", capsys=capsys
    )
    assert code == 2 and "NaN or infinite values" in one_error_line(err)


@pytest.mark.parametrize(
    "config",
    [
        "[1, 2, 3]",
        '{"format_version": 1}',
        None,  # a valid config naming a bridge far larger than its weights file
    ],
)
def test_damaged_bridge_config_is_refused(world, trained, tmp_path, config):
    import shutil

    bridge = tmp_path / "bridge"
    shutil.copytree(trained / "bridge", bridge)
    if config is None:
        data = json.loads((bridge / "bridge_config.json").read_text())
        data["bridge"]["d_anchor"] = 1_000_000  # would allocate gigabytes if built
        config = json.dumps(data)
    (bridge / "bridge_config.json").write_text(config)
    with pytest.raises(ConfigError, match="damaged"):
        load_composition(recipe_file(world, tmp_path / "r"), bridge=bridge)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x00\xff\xfe binary", "expected UTF-8 text"),
        (b'{"text": "a"}\n{"text": ', "line 2: not valid JSON"),
        (b"[1, 2]\n", "line 1: a JSON list, expected a JSON object"),
    ],
)
def test_malformed_data_file_api_and_app(app_session, tmp_path, content, expected):
    from app.handlers import recipe
    from composer.data import load_dataset

    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_dataset(path, build_char_tokenizer(), max_length=32)
    with pytest.raises(ConfigError, match=expected):  # the Data tab's preview
        recipe.preview_data(app_session, str(path))
    assert path.read_bytes() == content


def test_malformed_data_file_cli(world, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_bytes(b'{"text": "a"}\n{"text": ')
    recipe = recipe_file(world, tmp_path, data={"train": str(tmp_path / "data.jsonl")})
    code, err = cli("train", str(recipe), "--output", str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "line 2: not valid JSON" in one_error_line(err)
    assert not (tmp_path / "run" / "bridge").exists()


def test_bad_archive_is_refused_app(trained, tmp_path, monkeypatch):
    from app.handlers import bridges
    from app.session import Session

    session = Session.create(presets_dir=tmp_path / "no-presets", runs_dir=tmp_path / "runs")
    truncated = tmp_path / "bridge.zip"
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as bundle:
        for path in (trained / "bridge").iterdir():
            bundle.write(path, path.name)
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ConfigError, match="bridge.zip"):
        bridges.unpack_bridge(session, str(truncated))
    monkeypatch.setattr(bridges, "MAX_UNPACKED_BYTES", 1000)  # a "zip bomb" for this bound
    with pytest.raises(ConfigError, match="unpacks to .* refusing to unpack it"):
        bridges.unpack_bridge(session, str(whole))
    assert not any((tmp_path / "runs").rglob("bridge.safetensors"))  # nothing was extracted


# ---------------------------------------------------------------------------------------------
# Bridges made for other weights of the same shape


def test_a_bridge_for_a_same_shape_twin_is_refused_api(world, trained, tmp_path):
    twin = recipe_file(world, tmp_path, anchor={"model": str(world / "anchor-twin")})
    before = snapshot(trained / "bridge")
    with pytest.raises(ConfigError, match="anchor weights differ"):
        load_composition(twin, bridge=trained / "bridge")
    assert snapshot(trained / "bridge") == before
    # the anchor it was made for still loads it
    load_composition(recipe_file(world, tmp_path / "same"), bridge=trained / "bridge")


def test_a_bridge_for_a_same_shape_twin_is_refused_app(world, trained, tmp_path):
    from app.handlers import bridges, chat
    from app.session import Session

    session = Session.create(presets_dir=tmp_path / "no-presets", runs_dir=tmp_path / "runs")
    session.recipe = yaml.safe_load(
        recipe_file(world, tmp_path, anchor={"model": str(world / "anchor-twin")}).read_text()
    )
    chat.load_models(session)
    with pytest.raises(ConfigError, match="anchor weights differ"):
        bridges.load_bridge(session, folder=str(trained / "bridge"))
    assert session.loaded.bridge == ""  # the new bridge stays


# ---------------------------------------------------------------------------------------------
# Pairs decided from configs, before any weights are loaded


def _no_weights(monkeypatch):
    import composer.loading

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("weights were loaded before the pair was checked")

    monkeypatch.setattr(composer.loading, "load_model", refuse)


def test_other_vocabulary_cli_info_reports_alignment_by_characters(world, tmp_path, capsys):
    recipe = recipe_file(
        world, tmp_path, specialist={"model": str(world / "specialist-other-vocab")}
    )
    code = main(["info", str(recipe)])
    out = capsys.readouterr().out
    assert code == 0 and "two tokenizers (100 and 26 tokens)" in out
    assert "aligned by characters" in out


def test_heads_that_do_not_divide_the_width(world, tmp_path, capsys):
    recipe = recipe_file(world, tmp_path, bridge={"every": 2, "num_heads": 7})
    code, err = cli("info", str(recipe), capsys=capsys)
    assert code == 2 and "bridge.num_heads=7 does not divide the anchor width 64" in err


def test_max_length_beyond_positions(world, tmp_path, monkeypatch, capsys):
    from composer.train import train

    recipe = recipe_file(world, tmp_path, training={**TRAINING, "max_length": 1000})
    code, err = cli("info", str(recipe), capsys=capsys)
    assert code == 2
    assert "training.max_length is 1000 but the anchor has 256 positions" in one_error_line(err)
    _no_weights(monkeypatch)
    with pytest.raises(ConfigError, match="set training.max_length to at most 256"):
        train(recipe, output_dir=tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Training state that cannot lie


def _nan_after(monkeypatch, n: int) -> None:
    """The n-th training forward and every later one return a NaN loss."""
    from composer.composition import Composition

    forward = Composition.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= n:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Composition, "forward", poisoned)


def test_nan_loss_fails_the_run_and_keeps_the_last_finite_checkpoint(world, tmp_path, monkeypatch):
    from composer.train import TrainingFailed, train

    _nan_after(monkeypatch, 5)  # steps 1-4 are finite: checkpoints at 2 and 4
    output = tmp_path / "run"
    with pytest.raises(TrainingFailed, match="non-finite loss and gradient norm at step 5"):
        train(recipe_file(world, tmp_path), output_dir=output)
    status = progress.read_status(output)
    assert status["state"] == "failed" and "non-finite loss" in status["reason"]
    assert f"resume from {output / 'checkpoints' / 'step-4'}" in status["reason"]
    assert [step for step, _ in progress.checkpoints(output)] == [2, 4]
    for _, folder in progress.checkpoints(output):
        tensors = load_file(str(folder / "bridge.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert not (output / "bridge").exists()  # no non-finite bridge is ever exported


def test_nan_loss_cli_exits_1_with_one_line(world, tmp_path, monkeypatch, capsys):
    _nan_after(monkeypatch, 1)
    output = tmp_path / "run"
    code, err = cli(
        "train", str(recipe_file(world, tmp_path)), "--output", str(output), capsys=capsys
    )
    assert code == 1
    line = one_error_line(err)
    assert "non-finite loss" in line and "no checkpoint was written yet" in line


def test_a_non_finite_bridge_is_never_saved(world, tmp_path):
    composition = load_composition(recipe_file(world, tmp_path))
    with torch.no_grad():
        next(composition.bridge.parameters()).fill_(float("inf"))
    with pytest.raises(ConfigError, match="NaN or infinite values"):
        composition.save_bridge(str(tmp_path / "bridge"))
    assert not (tmp_path / "bridge").exists()


def _copy_run(trained: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(trained, target)
    return target


@pytest.mark.parametrize("change", ["anchor-twin", "data", "bridge"])
def test_a_run_folder_of_another_recipe_is_refused(world, trained, tmp_path, change):
    from composer.train import train

    output = _copy_run(trained, tmp_path / "run")
    if change == "anchor-twin":  # same shape, other weights: only the fingerprint tells
        recipe = recipe_file(world, tmp_path, anchor={"model": str(world / "anchor-twin")})
        expected = "other models or bridge settings"
    elif change == "data":
        other = tmp_path / "other.jsonl"
        other.write_text((world / "train.jsonl").read_text().replace("=", "=1"))
        recipe = recipe_file(world, tmp_path, data={"train": str(other)})
        expected = "other training or eval data"
    else:
        recipe = recipe_file(world, tmp_path, bridge={"every": 2, "num_heads": 4, "head_dim": 16})
        expected = "other models or bridge settings"
    before = snapshot(output)
    with pytest.raises(ConfigError, match=expected) as refused:
        train(recipe, output_dir=output)
    assert "Train into a new --output folder, or delete" in str(refused.value)
    assert snapshot(output) == before  # not "finished" again, not re-saved


def test_a_same_shape_twin_is_caught_by_its_weights(world, trained, tmp_path, monkeypatch):
    """Even when the recipe names the same folder, other weights in it are noticed."""
    from composer.train import train

    output = _copy_run(trained, tmp_path / "run")
    recipe = recipe_file(world, tmp_path)
    import composer.identity

    fingerprint = composer.identity.weights_fingerprint
    monkeypatch.setattr(
        composer.identity,
        "weights_fingerprint",
        lambda model: {k: [v + 1.0 for v in vs] for k, vs in fingerprint(model).items()},
    )
    with pytest.raises(ConfigError, match="anchor weights"):
        train(recipe, output_dir=output)


def test_the_same_recipe_resumes_its_own_folder(world, trained, tmp_path):
    from composer.train import train

    output = _copy_run(trained, tmp_path / "run")
    assert train(recipe_file(world, tmp_path), output_dir=output) == output / "bridge"


def test_two_processes_on_one_run_folder(world, tmp_path, capsys):
    from composer.train import train

    output = tmp_path / "run"
    fd = run_lock.acquire(output)  # another process holds the folder
    try:
        with pytest.raises(ConfigError, match="another training process .pid"):
            train(recipe_file(world, tmp_path), output_dir=output)
        code, err = cli(
            "train", str(recipe_file(world, tmp_path)), "--output", str(output), capsys=capsys
        )
        assert code == 2 and "is using the run folder" in one_error_line(err)
    finally:
        run_lock.release(fd)
    assert progress.read_status(output) is None  # the refused runs wrote nothing


def test_an_output_folder_that_cannot_be_written(world, tmp_path, capsys):
    from composer.train import train

    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(ConfigError, match="cannot write to the run folder"):
        train(recipe_file(world, tmp_path), output_dir=blocker / "run")
    code, err = cli(
        "train", str(recipe_file(world, tmp_path)), "--output", str(blocker / "run"), capsys=capsys
    )
    assert code == 2 and "cannot write to the run folder" in one_error_line(err)
    assert blocker.read_text() == "mine"
    if os.geteuid() != 0:  # root writes into read-only folders
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="cannot write to the run folder"):
            train(recipe_file(world, tmp_path), output_dir=readonly / "run")


_SLOW_CLI = """
import sys, time
from composer.composition import Composition
forward = Composition.forward
def slow(self, *a, **k):
    time.sleep(0.2)
    return forward(self, *a, **k)
Composition.forward = slow
from composer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_sigterm_is_one_line_and_the_status_promises_nothing_missing(world, tmp_path):
    training = {**TRAINING, "max_steps": 200, "save_every": 100}  # no checkpoint before the signals
    recipe = recipe_file(world, tmp_path, training=training)
    output = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, "train", str(recipe), "--output", str(output)],
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not progress.read_progress(output):
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "SIGTERM received twice" in one_error_line(err)
    status = progress.read_status(output)
    assert status["state"] == "failed"
    assert "no checkpoint was written yet" in status["reason"]
    assert progress.latest_checkpoint(output) is None


# ---------------------------------------------------------------------------------------------
# Bounded memory: inputs 100x beyond every bound, peak memory within a fixed budget

MEMORY_BUDGET_MB = 150  # the peak may grow this much over the whole script (unbounded: > 600)

_MEMORY_SCRIPT = """
import json, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from composer.chartok import build_char_tokenizer
from composer.config import ConfigError
from composer.data import load_dataset, preview
from composer.datafiles import max_chars
from composer.limits import CHARS_PER_POSITION
from composer.loading import load_composition
from composer.cli import main
from app.handlers import chat, recipe as recipe_handlers
from app.session import Session
import yaml

world, recipe_path, folder = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
tokenizer = build_char_tokenizer()
composition = load_composition(recipe_path)
session = Session.create(presets_dir=folder / "no-presets", runs_dir=folder / "runs")
session.recipe = yaml.safe_load(recipe_path.read_text())
chat.load_models(session)
recipe_handlers.tokenizer_for(session, composition.recipe.anchor)

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

max_length = 512
row = "ab" * (100 * max_chars(max_length) // 2)  # 100x the row bound
data = folder / "long.jsonl"
data.write_text(json.dumps({"text": row}) + "\\n" + json.dumps({"text": "x=1"}) + "\\n")
prompt = "a" * (100 * CHARS_PER_POSITION * 256)  # 100x the prompt bound (256 positions)
refused = {}
start = peak_mb()
split = load_dataset(data, tokenizer, max_length=max_length)
assert len(split.train[0].input_ids) == max_length
preview(data, tokenizer, max_length=max_length)
recipe_handlers.preview_data(session, str(data), max_length=max_length)
try:
    list(chat.stream_reply(session, [{"role": "user", "content": prompt}], chat.ChatSettings()))
except ConfigError as exc:
    refused["chat"] = str(exc)
try:
    composition.generate(torch.ones(1, 100 * 256, dtype=torch.long), max_new_tokens=4)
except ConfigError as exc:
    refused["generate"] = str(exc)
refused["cli"] = main(["generate", str(recipe_path), "--prompt", prompt])
print(json.dumps({"grown_mb": peak_mb() - start, "refused": refused}))
"""


@pytest.mark.slow
def test_inputs_100x_beyond_every_bound_stay_within_a_memory_budget(world, tmp_path):
    recipe = recipe_file(world, tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(world), str(recipe), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(REPO),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "the prompt is 819,200 characters" in report["refused"]["chat"]
    assert "the prompt is 25,600 tokens" in report["refused"]["generate"]
    assert report["refused"]["cli"] == 2 and "819,200 characters" in result.stderr
    assert report["grown_mb"] < MEMORY_BUDGET_MB, report


# ---------------------------------------------------------------------------------------------
# App endpoints: wrong types and folders outside the allowed roots


@pytest.fixture
def app_session(world, tmp_path):
    from app.session import Session

    session = Session.create(presets_dir=tmp_path / "no-presets", runs_dir=tmp_path / "runs")
    session.recipe = yaml.safe_load(recipe_file(world, tmp_path / "recipe").read_text())
    yield session
    session.close()


@pytest.mark.parametrize("folder", [5, 3.5, {"path": "x"}, ["a"], "relative-name", "/etc/calm"])
def test_save_bridge_never_writes_into_the_working_folder(
    app_session, tmp_path, monkeypatch, folder
):
    from app.handlers import bridges, chat

    cwd = tmp_path / "server-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    chat.load_models(app_session)
    if isinstance(folder, str) and not folder.startswith("/"):
        saved = Path(bridges.save_bridge(app_session, folder))  # relative: under the exports
        assert saved.parent == app_session.exports_dir and (saved / "bridge_config.json").is_file()
    else:
        with pytest.raises(ConfigError, match="expected a folder path as text|outside the folders"):
            bridges.save_bridge(app_session, folder)
    assert list(cwd.iterdir()) == []
    assert not Path("/etc/calm").exists()


def test_app_handlers_refuse_wrong_types_with_a_message(app_session):
    from app.handlers import bridges, chat, recipe, runs

    cases = [
        (lambda: recipe.apply_preset(app_session, 5), "the preset is 5"),
        (lambda: recipe.set_models(app_session, anchor={"a": 1}, specialist="x"), "anchor model"),
        (lambda: recipe.set_data_file(app_session, ["x"]), "the data file is"),
        (lambda: recipe.preview_data(app_session, 7), "the data file is 7"),
        (lambda: runs.start_training(app_session, run_name=3, hyperparameters={}), "run name 3"),
        (lambda: runs.resume_training(app_session, {"x": 1}), "is not text"),
        (lambda: runs.stop_training(app_session, "../../etc"), "not usable as a folder name"),
        (lambda: bridges.load_bridge(app_session, folder=9), "expected a folder path"),
        (lambda: bridges.load_bridge(app_session, archive=9), "expected the path of an uploaded"),
        (lambda: bridges.push_to_hub(app_session, folder=None, repo_id=5), "is not text"),
        (lambda: chat.flatten_history(5), "expected a list of messages"),
        (lambda: chat.ChatSettings(max_new_tokens="many").generation(), "max_new_tokens is"),
        (lambda: chat.ChatSettings(top_k=2.5).generation(), "expected a whole number"),
    ]
    for call, expected in cases:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            call()
    assert runs.run_view(app_session, "../../etc").state == "none"


def test_a_prompt_over_the_context_is_refused_before_any_forward(app_session):
    from app.handlers import chat

    chat.load_models(app_session)
    anchor = app_session.loaded.composition.anchor
    calls = {"n": 0}
    hook = anchor.register_forward_pre_hook(lambda *_: calls.update(n=calls["n"] + 1))
    try:
        long = [{"role": "user", "content": "ab=1;" * 60}]  # under the character bound only
        with pytest.raises(ConfigError, match=r"the prompt is \d+ tokens; the anchor's context"):
            list(chat.stream_reply(app_session, long, chat.ChatSettings()))
        assert calls["n"] == 0
        # a prompt that fits, with a reply that would not: the reply is shortened, not refused
        fits = [{"role": "user", "content": "ab=1;" * 40}]
        replies = list(chat.stream_reply(app_session, fits, chat.ChatSettings(max_new_tokens=500)))
        assert calls["n"] > 0 and replies
    finally:
        hook.remove()


def _wait_for_state(session, name: str, states: tuple[str, ...], timeout: float = 240):
    from app.handlers import runs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = runs.run_view(session, name)
        if view.state in states:
            return view
        time.sleep(0.3)
    raise AssertionError(f"run {name} never reached {states}: {view.state}\n{view.log_tail}")


@pytest.mark.slow
def test_concurrent_start_and_resume_run_one_process(world, tmp_path):
    """Start from one client and Resume from another (and from a second app on the same runs
    folder) at the same moment: one training process, the others get a message."""
    from app.handlers import runs
    from app.session import Session

    recipe = yaml.safe_load(recipe_file(world, tmp_path / "recipe").read_text())
    recipe["training"] = {**TRAINING, "max_steps": 30, "save_every": 10}
    apps = [Session.create(presets_dir=tmp_path / "none", runs_dir=tmp_path / "runs") for _ in "ab"]
    for session in apps:
        session.recipe = recipe
    # a stopped run to resume: its folder exists with a recipe
    folder = tmp_path / "runs" / "race"
    folder.mkdir(parents=True)
    (folder / runs.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def attempt(session, action) -> None:  # noqa: ANN001
        barrier.wait()
        try:
            action(session)
            outcomes.append("started")
        except ConfigError as exc:
            outcomes.append(f"refused: {exc}")

    actions = [
        (apps[0], lambda s: runs.resume_training(s, "race")),
        (apps[0], lambda s: runs.resume_training(s, "race")),
        (apps[1], lambda s: runs.resume_training(s, "race")),
        (apps[1], lambda s: runs.start_training(s, run_name="race", hyperparameters={})),
    ]
    threads = [threading.Thread(target=attempt, args=a) for a in actions]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert outcomes.count("started") == 1, outcomes
        refusals = [o for o in outcomes if o.startswith("refused")]
        assert all(
            "still training" in o
            or "being trained by another process" in o
            or "already exists" in o
            for o in refusals
        ), refusals
        alive = [p for s in apps for p in s.processes.values() if p.poll() is None]
        assert len(alive) == 1
        owner = next(s for s in apps if s.processes)
        view = _wait_for_state(owner, "race", ("finished", "failed"))
        assert view.state == "finished", view.reason
    finally:
        for session in apps:
            session.close()


# Gradio's own messages for a value a component cannot take (shown with show_error=True, as
# launch.py serves the app), and ours; never a bare Python error or the generic "has raised an
# exception" of an app that hides its messages.
_RAW_PYTHON_ERROR = re.compile(r"^(TypeError|AttributeError|KeyError|IndexError|ValueError)\b")


@pytest.mark.slow
def test_every_named_endpoint_answers_wrong_types_with_a_message(tmp_path, monkeypatch):
    gradio_client = pytest.importorskip("gradio_client")
    from app.main import build_app
    from tests.test_app_support import free_port, make_pico_preset

    cwd = tmp_path / "server-cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    presets = make_pico_preset(tmp_path, max_steps=4)
    demo = build_app(presets_dir=presets, runs_dir=tmp_path / "runs", models_dir=presets / "models")
    demo.queue().launch(
        prevent_thread_lock=True, server_port=free_port(), quiet=True, show_error=True
    )
    try:
        client = gradio_client.Client(demo.local_url, verbose=False)
        client.predict("", api_name="/load_models")  # so the model endpoints reach their checks
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert len(endpoints) > 20
        answered = 0
        for name, info in sorted(endpoints.items()):
            if name in ("/start_training", "/fetch_models"):
                continue  # a number is a valid run name: would start a run (handler test above)
            for bad in (12345, {"a": 1}, [1, 2]):
                try:
                    client.predict(*([bad] * len(info["parameters"])), api_name=name)
                except Exception as exc:  # noqa: BLE001 - the message is what is checked
                    message = str(exc)
                    assert message.strip(), name
                    assert "has not enabled verbose error reporting" not in message, name
                    assert "Traceback" not in message, (name, message)
                    assert not _RAW_PYTHON_ERROR.match(message), (name, message)
                answered += 1
        assert answered >= 3 * 20
        # the server is alive and still serves the page's state
        assert client.predict(api_name="/load_page")[0]["value"] == "pico"
        assert list(cwd.iterdir()) == []  # nothing was written into the server's working folder
    finally:
        demo.calm_session.close()
        demo.close()


def test_a_dead_run_without_a_checkpoint_promises_none(app_session):
    from app.handlers import runs

    app_session.train_command = [sys.executable, "-c", "import sys; sys.exit(1)"]
    name = runs.start_training(app_session, run_name="dies", hyperparameters={})
    view = _wait_for_state(app_session, name, ("failed",), timeout=60)
    assert "no checkpoint was written: press Resume to start it again" in view.reason
    assert "continue from" not in view.reason
