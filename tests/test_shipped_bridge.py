"""The default preset's trained bridge ships with it (presets/bridges/kv-arithmetic/, made by
scripts/ship_default_bridge.py): it loads with the preset, keeps its documented held-out
figure, and the app selects it and offers held-out examples on first open."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from composer.presets import read_preset

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "kv-arithmetic.yaml"
FLOOR = 0.75  # the preset's promise (tests/test_default_preset.py), whatever the card says


def documented(bridge: Path) -> dict[str, float]:
    """The figures the shipping script measured and wrote into the bridge's README."""
    match = re.search(r"<!-- measured: (\{.*?\}) -->", (bridge / "README.md").read_text())
    assert match, f"{bridge}/README.md lacks the measured figures; rerun the shipping script"
    return json.loads(match.group(1))


def test_the_default_preset_ships_a_trained_bridge_with_relative_paths():
    preset = read_preset(PRESET)
    bridge = preset.shipped_bridge
    assert bridge is not None and bridge == PRESET.parent / "bridges" / "kv-arithmetic"
    recipe = (bridge / "composition.yaml").read_text()
    config = (bridge / "bridge_config.json").read_text()
    for text in (recipe, config):  # no path of the machine that made it
        assert str(ROOT) not in text and "/tmp/" not in text
    assert (bridge / "bridge.safetensors").stat().st_size < 4_000_000  # ~0.5M float32 params
    assert documented(bridge)["KV-MATH"] >= FLOOR


@pytest.mark.slow
def test_the_shipped_bridge_keeps_its_documented_held_out_figure():
    import torch

    from composer.loading import load_composition
    from composer.repro.kv import score_worked

    torch.set_num_threads(2)
    preset = read_preset(PRESET)
    composition = load_composition(PRESET, bridge=preset.shipped_bridge, device="cpu")
    held_out = [json.loads(line) for line in open(preset.config.data["eval"])]
    scores = score_worked(composition, held_out)
    promised = documented(preset.shipped_bridge)
    # Greedy decoding of the same weights: equal up to a rare float tie between machines.
    assert abs(scores["KV-MATH"] - promised["KV-MATH"]) <= 0.01, (scores, promised)
    assert abs(scores["KV-SUBS"] - promised["KV-SUBS"]) <= 0.01, (scores, promised)
    assert scores["KV-MATH"] >= FLOOR


# --- the app: the shipped bridge is selected on first open ------------------------------------


@pytest.fixture
def pico_presets(tmp_path) -> Path:
    from tests.test_app_support import make_pico_preset

    presets = make_pico_preset(tmp_path)
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in (11, 12, 13, 14, 15, 16)]
    (presets / "data" / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (
        (presets / "pico.yaml").read_text().replace("eval_fraction: 0.1", "eval: data/held.jsonl")
    )
    (presets / "pico.yaml").write_text(text)
    return presets


def _session(presets: Path, tmp_path: Path):
    from app.session import Session

    return Session.create(presets_dir=presets, runs_dir=tmp_path / "runs")


def test_without_a_shipped_bridge_the_chat_starts_with_a_new_one(pico_presets, tmp_path):
    from app.handlers import bridges, chat

    session = _session(pico_presets, tmp_path)
    assert bridges.shipped_bridge(session) is None
    assert bridges.preferred_bridge(session) == chat.NEW_BRIDGE
    assert [label for label, _ in bridges.bridge_choices(session)] == ["new (untrained) bridge"]
    assert chat.example_prompts(session, count=4) == ["11+11=", "12+12=", "13+13=", "14+14="]


def test_a_shipped_bridge_is_offered_selected_and_loads(pico_presets, tmp_path):
    from app.handlers import bridges, chat

    session = _session(pico_presets, tmp_path)
    chat.load_models(session)  # a new bridge, saved as if shipped
    shipped = pico_presets / "bridges" / "pico"
    session.loaded.composition.save_bridge(str(shipped))
    session.close()

    session = _session(pico_presets, tmp_path)
    assert bridges.preferred_bridge(session) == str(shipped)
    assert ("shipped pico (trained)", str(shipped)) in bridges.bridge_choices(session)
    chat.load_models(session, bridge=bridges.preferred_bridge(session))
    assert session.loaded.bridge == str(shipped)
    assert bridges.preferred_bridge(session) == str(shipped)  # what is loaded stays selected
    session.close()

    shutil.rmtree(shipped)
    (shipped).mkdir(parents=True)  # an empty folder is no bridge
    assert bridges.shipped_bridge(_session(pico_presets, tmp_path)) is None
