"""Config validation, pairing decisions, the architecture table, and the import boundary."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Annotated, Literal

import pytest
import torch
import transformers
from annotated_types import Ge, Gt, Le, Lt

from composer.architectures import ARCHITECTURES, decoder_layers, model_shape
from composer.config import (
    BridgeConfig,
    CompositionConfig,
    ConfigError,
    GenerationConfig,
    ModelSpec,
    Number,
    Positive,
    build,
    expectation,
    read_recipe,
)
from composer.pairing import default_pairs, resolve_pairs
from composer.training_config import DataConfig, TrainingConfig


def test_paper_pairing_every_fourth_specialist_layer():
    # 24-layer specialist, 32-layer anchor: 6 blocks, specialist 3, 7, ..., 23.
    pairs = default_pairs(anchor_layers=32, specialist_layers=24, every=4)
    assert [s for _, s in pairs] == [3, 7, 11, 15, 19, 23]
    anchors = [a for a, _ in pairs]
    assert anchors[-1] == 31 and anchors == sorted(anchors) and len(set(anchors)) == 6
    gaps = {b - a for a, b in zip(anchors, anchors[1:], strict=False)}
    assert gaps <= {5, 6}  # evenly spaced


def test_pairing_never_names_a_missing_layer():
    for anchor_layers in range(1, 40):
        for specialist_layers in range(4, 40):
            for a, s in default_pairs(
                anchor_layers=anchor_layers, specialist_layers=specialist_layers
            ):
                assert 0 <= a < anchor_layers and 0 <= s < specialist_layers


def test_explicit_pairs_are_checked_against_depth():
    config = BridgeConfig(pairs=((1, 2), (5, 9)))
    with pytest.raises(ConfigError, match="specialist layer 9, but the specialist has layers 0..7"):
        resolve_pairs(config, anchor_layers=6, specialist_layers=8)
    assert resolve_pairs(BridgeConfig(pairs=((1, 2),)), anchor_layers=6, specialist_layers=8) == (
        (1, 2),
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"every": 0}, "bridge.every is 0"),
        ({"pairs": [[1]]}, "bridge.pairs is"),
        ({"pairs": [[-1, 2]]}, "0-based"),
        ({"num_heads": 0}, "bridge.num_heads is 0"),
        ({"dtype": "int4"}, "bridge.dtype is 'int4'"),
    ],
)
def test_bad_bridge_settings_name_the_field(settings, message):
    with pytest.raises(ConfigError, match=message):
        BridgeConfig(**settings)


def test_recipe_validation_messages(tmp_path):
    with pytest.raises(ConfigError, match="no 'specialist' section"):
        CompositionConfig.from_dict({"anchor": {"model": "a/b"}})
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['quantisation'\] in 'anchor'"):
        CompositionConfig.from_dict(
            {"anchor": {"model": "a/b", "quantisation": "nf4"}, "specialist": "c/d"}
        )
    with pytest.raises(ConfigError, match="quantization is 'q4'"):
        ModelSpec(model="a/b", quantization="q4")
    bad = tmp_path / "bad.yaml"
    bad.write_text("anchor: {model: a/b\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        read_recipe(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        read_recipe(tmp_path / "missing.yaml")


def test_recipe_round_trips_through_a_dict():
    config = CompositionConfig.from_dict(
        {
            "anchor": {"model": "org/big", "quantization": "nf4"},
            "specialist": "org/small",
            "bridge": {"pairs": [[3, 1]], "num_heads": 8, "head_dim": 64},
            "training": {"lr": 0.001},
        }
    )
    assert CompositionConfig.from_dict(config.to_dict()) == config
    assert config.bridge.pairs == ((3, 1),)


TINY = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
}


@pytest.mark.parametrize("model_type", [*sorted(TINY), "gpt2", "gemma3"])
def test_architecture_table_finds_layers_of_each_family(model_type):
    from transformers import AutoModelForCausalLM

    assert model_type in ARCHITECTURES
    if model_type == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4)
    elif model_type == "gemma3":
        text = dict(
            vocab_size=64,
            pad_token_id=0,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
        config = transformers.Gemma3Config(
            text_config=text,
            vision_config={
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            },
        )
    else:
        config = TINY[model_type](
            vocab_size=64,
            pad_token_id=0,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = model_shape(model.config)
    assert (shape.width, shape.num_layers, shape.num_heads) == (32, 3, 4)
    assert len(decoder_layers(model)) == 3


def test_import_composer_does_not_load_gradio_or_torch():
    code = (
        "import sys, composer; composer.ConfigError; "
        "print('gradio' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_recipe_model_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "models" / "small").mkdir(parents=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("anchor: {model: models/small}\nspecialist: org/hub-model\n")
    config = read_recipe(recipe)
    assert config.anchor.model == str((tmp_path / "models" / "small").resolve())
    assert config.specialist.model == "org/hub-model"  # not a path beside the recipe: a hub id


def test_a_preset_file_is_a_recipe(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("default: true\nanchor: org/a\nspecialist: org/b\n")
    assert read_recipe(preset).anchor.model == "org/a"


def test_every_recipe_setting_carries_its_help_text_and_the_reference_lists_it():
    import dataclasses

    from composer.config import GenerationConfig, reference
    from composer.training_config import DataConfig, TrainingConfig

    classes = (ModelSpec, BridgeConfig, GenerationConfig, TrainingConfig, DataConfig)
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    lines = reference({"training": TrainingConfig})
    assert lines[0] == "training:"
    assert "  lr (default: 0.001): Peak learning rate" in "\n".join(lines)
    assert len(lines) == 1 + len(dataclasses.fields(TrainingConfig))


def test_what_a_field_expects_is_said_from_its_type():
    assert expectation(Positive) == "a whole number >= 1"
    assert expectation(Annotated[Number, Gt(0), Le(1)]) == "a number in (0, 1]"
    assert expectation(Annotated[Number, Ge(0), Lt(1)]) == "a number in [0, 1)"
    assert expectation(Annotated[Number, Gt(0)]) == "a number > 0"
    assert expectation(Literal["a", "b"]) == "one of a, b"
    assert expectation(Positive | None) == "a whole number >= 1"
    assert expectation(bool) == "true or false"


SECTIONS = {
    "bridge": BridgeConfig,
    "generation": GenerationConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "anchor": ModelSpec,
}


@pytest.mark.parametrize(
    ("where", "name"),
    [(where, f.name) for where, cls in SECTIONS.items() for f in dataclasses.fields(cls)],
)
def test_every_setting_refuses_a_wrong_value_by_name(where, name):
    """Each field of each section, given a value of no type it accepts, is refused with a
    message naming where.field and the value (never a pydantic dump or a TypeError)."""
    values = {"model": "some/model"} if where == "anchor" else {}
    with pytest.raises(ConfigError) as error:
        build(SECTIONS[where], {**values, name: object}, where)
    message = str(error.value)
    assert message.startswith(f"{where}.{name} is <class 'object'>; expected "), message
    assert "pydantic" not in message and "\n" not in message
