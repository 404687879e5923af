"""Train the default preset's bridge and write the shipped copy (presets/bridges/kv-arithmetic/).

Usage: python scripts/ship_default_bridge.py [--work DIR] [--threads 2]
The bridge is trained through the library (`composer.train.train`, the preset's own settings,
exactly what the Train tab and `calm-composer train` do), scored on the preset's held-out keys,
and copied into the presets folder with paths relative to it, so the app can offer it on first
open without training. tests/test_shipped_bridge.py checks the copy against the figure this
script writes into its README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from composer.export import CARD, CONFIG, RECIPE, model_card
from composer.loading import load_composition
from composer.presets import read_preset
from composer.repro.kv import score_worked
from composer.train import train

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "kv-arithmetic.yaml"
OUT = ROOT / "presets" / "bridges" / "kv-arithmetic"


def relative_recipe(preset_path: Path, bridge_dir: Path) -> dict:
    """The preset's recipe with its model and data paths relative to ``bridge_dir`` (pure-ish:
    reads only the YAML), so the shipped folder works from any checkout or install."""
    recipe = yaml.safe_load(preset_path.read_text(encoding="utf-8"))
    base = preset_path.parent.resolve()
    rel = Path(*([".."] * len(bridge_dir.resolve().relative_to(base).parts)))

    def moved(value: str) -> str:
        return str(rel / value)

    out = {k: recipe[k] for k in ("anchor", "specialist", "bridge", "generation") if k in recipe}
    out["anchor"] = {**recipe["anchor"], "model": moved(recipe["anchor"]["model"])}
    out["specialist"] = {**recipe["specialist"], "model": moved(recipe["specialist"]["model"])}
    return out


def make_portable(folder: Path, *, scores: dict, seconds: float, threads: int) -> None:
    """Rewrite a trained bridge folder for shipping: model names and the recipe relative to the
    presets folder (names in bridge_config.json are informative only, a different name is not a
    mismatch, but no path of the machine that made it belongs in a shipped file), and the model
    card with the measured held-out figures (which tests/test_shipped_bridge.py checks)."""
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    recipe = relative_recipe(PRESET, OUT)
    for role in ("anchor", "specialist"):
        config[role]["name"] = Path(recipe[role]["model"]).name
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    shipped = (
        "\n## Shipped with calm-composer\n\n"
        "The default preset's bridge (presets/kv-arithmetic.yaml), trained with its own "
        "settings by `python scripts/ship_default_bridge.py` "
        f"({threads} thread(s), {seconds:.0f} s on the machine that made it). On the preset's "
        f"200 held-out-key expressions (worked form) it gets the sum right in "
        f"{scores['KV-MATH']:.1%} (held-out KV-MATH) and writes the values in correctly in "
        f"{scores['KV-SUBS']:.1%}.\n\n"
        f"<!-- measured: {json.dumps({k: round(v, 4) for k, v in scores.items()})} -->\n"
    )
    (folder / CARD).write_text(model_card(config, shipped), encoding="utf-8")


def main(work: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    bridge = train(PRESET, output_dir=work / "run")
    seconds = time.perf_counter() - start
    composition = load_composition(PRESET, bridge=bridge, device="cpu")
    held_out = [json.loads(line) for line in open(read_preset(PRESET).config.data["eval"])]
    scores = score_worked(composition, held_out)
    print(f"trained in {seconds:.0f} s; held-out {scores}")

    staging = work / "shipped"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bridge, staging)
    make_portable(staging, scores=scores, seconds=seconds, threads=threads)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staging, OUT)
    OUT.chmod(0o755)  # the run folder was a private temporary one; shipped files are public
    for path in OUT.iterdir():
        path.chmod(0o644)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.work is None:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp), args.threads)
    else:
        main(args.work, args.threads)
