"""The command line on pico models saved as real folders."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from composer.cli import main
from composer.generate import text_input_ids
from composer.loading import load_composition
from tests.conftest import pico_llama, pico_qwen2, randomize_bridge


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from composer.chartok import build_char_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_char_tokenizer()
    for name, model in (
        ("anchor", pico_llama(vocab_size=len(tokenizer))),
        ("specialist", pico_qwen2(vocab_size=len(tokenizer))),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    path = root / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "pico",
                "anchor": {"model": str(root / "anchor")},
                "specialist": {"model": str(root / "specialist")},
                "bridge": {"every": 2, "num_heads": 2, "head_dim": 16},
                "generation": {"max_new_tokens": 8},
            }
        )
    )
    return path


def test_info_shows_pairs_size_and_memory(recipe, capsys):
    assert main(["info", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "bridge: 4 blocks, 2 heads x 16" in out
    assert "% of the anchor" in out and "GiB" in out
    assert "  1 <- 1" in out  # first layer pair


def test_generate_streams_the_composed_reply(recipe, tmp_path, capsys):
    composition = load_composition(recipe)
    randomize_bridge(composition, scale=0.3)
    composition.save_bridge(tmp_path / "bridge")
    prompt = "ab+c="
    ids = text_input_ids(composition.tokenizer, prompt)  # BOS first, as training reads text
    expected = composition.tokenizer.decode(
        composition.generate(ids, max_new_tokens=8)[0], skip_special_tokens=True
    )
    assert (
        main(["generate", str(recipe), "--bridge", str(tmp_path / "bridge"), "--prompt", prompt])
        == 0
    )
    assert capsys.readouterr().out.strip() == expected.strip()


def test_user_errors_are_one_line_and_exit_2(recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("every: 2", "every: 0"))
    result = subprocess.run(
        [sys.executable, "-m", "composer.cli", "info", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "calm-composer: error: bridge.every is 0; expected a whole number >= 1 (paper: 4)"
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "composer.cli",
            "generate",
            str(recipe),
            "--bridge",
            str(tmp_path),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a bridge folder" in result.stderr


def test_plan_and_train_commands(recipe, tmp_path, capsys):
    import json

    data = tmp_path / "train.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) for i in range(12))
    )
    config = yaml.safe_load(recipe.read_text())
    config["training"] = {"max_steps": 3, "batch_size": 4, "logging_every": 1, "save_every": 2}
    config["data"] = {"train": str(data)}
    trainable = tmp_path / "recipe.yaml"
    trainable.write_text(yaml.safe_dump(config))

    assert main(["plan", str(trainable)]) == 0
    assert "GiB" in capsys.readouterr().out
    assert main(["plan", str(trainable), "--gpu-gb", "6"]) == 0
    assert "fits in a 6 GiB CUDA GPU: 6.00 GiB free of 6.00 GiB" in capsys.readouterr().out
    assert main(["plan", str(trainable), "--gpu-gb", "0.0001"]) == 0
    assert "does NOT fit in a 0.0001 GiB CUDA GPU" in capsys.readouterr().out
    assert main(["plan", str(trainable), "--gpu-gb", "-1"]) == 2

    assert main(["train", str(trainable), "--output", str(tmp_path / "run")]) == 0
    assert "bridge saved to" in capsys.readouterr().out
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "finished"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "progress.jsonl").open()]
    assert steps == [1, 2, 3]
    assert (
        main(
            [
                "generate",
                str(trainable),
                "--bridge",
                str(tmp_path / "run" / "bridge"),
                "--prompt",
                "3+3=",
            ]
        )
        == 0
    )


def test_fields_prints_each_settings_help_from_the_config_classes(capsys):
    assert main(["fields", "training"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("training:\n")
    assert "max_length (default: 512): Tokens per example" in out
    assert "bridge:" not in out
    assert main(["fields", "trainig"]) == 2
    assert "recipe section 'trainig' does not exist" in capsys.readouterr().err
