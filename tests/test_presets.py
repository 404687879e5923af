"""Presets: validated recipes read from a folder, paths resolved against the preset's folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from composer.config import ConfigError
from composer.presets import default_preset, list_presets, read_preset, scan_presets


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


RECIPE = {
    "name": "Pico pair",
    "anchor": {"model": "models/anchor", "quantization": "nf4"},
    "specialist": "./models/specialist.gguf",
    "bridge": {"every": 2},
    "training": {"max_steps": 5},
    "data": {"train": "data/train.jsonl"},
}


def test_relative_paths_resolve_against_the_preset_folder(tmp_path):
    (tmp_path / "presets" / "models" / "anchor").mkdir(parents=True)
    (tmp_path / "presets" / "models" / "specialist.gguf").write_bytes(b"GGUF")
    path = _write(tmp_path / "presets" / "pico.yaml", {**RECIPE, "default": True})
    preset = read_preset(path)
    base = (tmp_path / "presets").resolve()
    assert preset.id == "pico" and preset.default is True and preset.title == "Pico pair"
    assert preset.config.anchor.model == str(base / "models" / "anchor")
    assert preset.config.anchor.quantization == "nf4"
    assert preset.config.specialist.model == str(base / "models" / "specialist.gguf")
    assert preset.config.data["train"] == str(base / "data" / "train.jsonl")
    assert preset.config.training["max_steps"] == 5


def test_hub_ids_and_absolute_paths_stay_as_written(tmp_path):
    recipe = {"anchor": "Qwen/Qwen2.5-0.5B", "specialist": {"model": str(tmp_path / "s")}}
    preset = read_preset(_write(tmp_path / "hub.yaml", recipe))
    assert preset.config.anchor.model == "Qwen/Qwen2.5-0.5B"
    assert preset.config.specialist.model == str(tmp_path / "s")
    recipe = {"anchor": "models/missing", "specialist": "./not-here.gguf"}
    preset = read_preset(_write(tmp_path / "missing.yaml", recipe))
    assert preset.config.anchor.model == "models/missing"  # could be a hub id: as written
    # a .gguf name is a file: resolved, so a missing one is reported where it is expected
    assert preset.config.specialist.model == str(tmp_path.resolve() / "not-here.gguf")
    assert preset.default is False


def test_list_presets_is_sorted_and_strict(tmp_path):
    _write(tmp_path / "b.yaml", RECIPE)
    _write(tmp_path / "a.yml", RECIPE)
    _write(tmp_path / "notes.txt", "not a preset")
    assert [pid for pid, _, _ in list_presets(tmp_path)] == ["a", "b"]
    _write(tmp_path / "c.yaml", {**RECIPE, "bridge": {"every": 0}})
    with pytest.raises(ConfigError, match=r"preset 'c': bridge.every is 0"):
        list_presets(tmp_path)


def test_scan_skips_invalid_presets_and_reports_each(tmp_path):
    _write(tmp_path / "good.yaml", {**RECIPE, "default": True})
    _write(tmp_path / "typo.yaml", {**RECIPE, "anchr": {"model": "x"}})
    _write(tmp_path / "broken.yaml", "anchor: [unclosed\n")
    _write(tmp_path / "flag.yaml", {**RECIPE, "default": "yes"})
    presets, problems = scan_presets(tmp_path)
    assert [p.id for p in presets] == ["good"]
    assert default_preset(presets).id == "good"
    text = "\n".join(problems)
    assert "unknown recipe section(s) ['anchr']" in text
    assert "broken.yaml' is not valid YAML at line" in text
    assert "default: 'yes'; expected true or false" in text


def test_one_default_wins_when_several_claim_it(tmp_path):
    _write(tmp_path / "a.yaml", {**RECIPE, "default": True})
    _write(tmp_path / "b.yaml", {**RECIPE, "default": True})
    presets, problems = scan_presets(tmp_path)
    assert [p.id for p in presets if p.default] == ["a"]
    assert "both say default: true" in problems[0]


def test_no_default_and_no_folder_are_fine(tmp_path):
    _write(tmp_path / "a.yaml", RECIPE)
    presets, problems = scan_presets(tmp_path)
    assert default_preset(presets) is None and problems == []
    assert scan_presets(tmp_path / "missing") == ([], [])


def test_empty_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="is empty"):
        read_preset(_write(tmp_path / "e.yaml", ""))
    with pytest.raises(ConfigError, match="does not exist"):
        read_preset(tmp_path / "nope.yaml")


SHIPPED = Path(__file__).resolve().parents[1] / "presets"

# Published config.json values of the hub models the GPU presets name (no hub here to read them).
QWEN25_1_5B = dict(  # Qwen2.5-1.5B's shape, shared by its Coder and Math versions
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)
HUB_CONFIGS = {
    "Qwen/Qwen2.5-7B-Instruct": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": QWEN25_1_5B,
    "Qwen/Qwen2.5-Math-1.5B-Instruct": QWEN25_1_5B,
}


def test_shipped_presets_are_valid():
    presets = list_presets(SHIPPED)  # raises on the first invalid one
    assert len({pid for pid, _, _ in presets}) == len(presets)


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_shipped_preset_is_complete(path):
    """Described, sized, trainable as written, with models and data a user can get."""
    from composer.model_files import known_file
    from composer.training_config import DataConfig, TrainingConfig

    preset = read_preset(path)
    config = preset.config
    assert config.name and len(config.description) > 100 and config.expect
    assert isinstance(config.hardware.get("cpu"), bool)
    assert isinstance(config.hardware.get("min_gpu_memory_gb"), (int, float))
    training = TrainingConfig.from_mapping(config.training)
    assert training.max_steps
    data = DataConfig.from_mapping(config.data)
    for role in ("anchor", "specialist"):
        model = getattr(config, role).model
        local = Path(model).exists() or known_file(model) is not None
        assert local or model in HUB_CONFIGS, f"{role} {model}: not shipped, fetchable or known"
    if config.hardware["cpu"]:  # runs here: its data ships in the repository
        assert Path(data.train).is_file()
        assert data.eval is None or Path(data.eval).is_file()
    else:  # the description says how to get the data
        assert "hf download" in config.description


@pytest.mark.parametrize(
    "path", sorted(p for p in SHIPPED.glob("*.yaml") if "gpu" in p.stem), ids=lambda p: p.stem
)
def test_gpu_presets_fit_the_gpu_they_name(path):
    """The planner, on the hub models' published configs, fits the stated GPU (10% headroom)."""
    import torch
    from transformers import Qwen2Config

    from composer.memory import GIB, DeviceMemory, plan

    preset = read_preset(path)
    gb = preset.config.hardware["min_gpu_memory_gb"]
    configs = {
        role: Qwen2Config(**HUB_CONFIGS[getattr(preset.config, role).model])
        for role in ("anchor", "specialist")
    }
    gpu = DeviceMemory(name=f"{gb} GiB", total_bytes=gb * GIB, available_bytes=gb * GIB)
    estimate = plan(preset.config, device=torch.device("cuda"), model_configs=configs, memory=gpu)
    assert estimate.fits, "\n".join(estimate.format())
    smaller = DeviceMemory(name="half", total_bytes=gb * GIB // 2, available_bytes=gb * GIB // 2)
    assert not plan(
        preset.config, device=torch.device("cuda"), model_configs=configs, memory=smaller
    ).fits


def test_reading_presets_does_not_import_torch():
    code = (
        "import sys; from composer.presets import scan_presets; scan_presets('presets'); "
        "print('torch' in sys.modules, 'gradio' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_the_8gb_preset_plans_under_7_5_gib_with_both_models_in_4_bit():
    """The 8 GB card's preset: planned peak <= 7.5 GiB (room for the CUDA context), both
    models nf4, checkpointing and paged 8-bit AdamW; its `expect` says it is unmeasured."""
    import torch
    from transformers import Qwen2Config

    from composer.memory import GIB, DeviceMemory, plan

    preset = read_preset(SHIPPED / "qwen2.5-7b-math-gpu-8gb.yaml")
    config = preset.config
    assert config.hardware["min_gpu_memory_gb"] == 8
    assert config.anchor.quantization == config.specialist.quantization == "nf4"
    assert config.training["gradient_checkpointing"] is True
    assert config.training["optimizer"] == "paged_adamw_8bit"
    configs = {
        role: Qwen2Config(**HUB_CONFIGS[getattr(config, role).model])
        for role in ("anchor", "specialist")
    }
    card = DeviceMemory(name="8 GiB", total_bytes=8 * GIB, available_bytes=8 * GIB)
    estimate = plan(config, device=torch.device("cuda"), model_configs=configs, memory=card)
    assert estimate.total_bytes <= 7.5 * GIB, "\n".join(estimate.format())
    assert estimate.fits
    assert f"{estimate.total_bytes / GIB:.2f} GiB" in preset.config.expect  # stated as planned
    assert "not measured on a gpu" in " ".join(preset.config.expect.lower().split())
