"""GPU checks in one run: a 7B-config anchor in 4-bit (memory against the plan, training speed),
composed decoding speed against the anchor alone, and the default preset trained on CUDA.

Models are built from the published configs with random weights (memory and speed do not depend
on the values), directly on the GPU in bfloat16, then quantised to nf4 in memory, the same
Linear4bit layout that loading with a BitsAndBytesConfig gives. Training goes through
``composer.train.train`` with the preset's own settings (batch, length, gradient checkpointing,
optimizer) on full-length rows, so the peak is the worst case the planner estimates. Each part
writes its numbers as soon as it has them; a failing part is recorded and the next one runs.

    python benchmarks/gpu_check.py --out DIR [--preset presets/qwen2.5-7b-coder-gpu.yaml]
Writes DIR/gpu_check.json and DIR/gpu_check.md (a section for docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from composer.hardware import configure_cuda_allocator  # noqa: E402
from composer.memory import GIB, plan, probe_device  # noqa: E402

GPU_PRESETS = ("presets/qwen2.5-7b-coder-gpu.yaml", "presets/qwen2.5-7b-math-gpu.yaml")
DEVICE = torch.device("cuda")
TINY = False  # --tiny


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", help="folder for gpu_check.json / .md (required; with --tiny: a temp folder)"
    )
    parser.add_argument("--preset", default=GPU_PRESETS[0])
    parser.add_argument("--train-steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per way")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: 7b,decode,kv")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="check the script itself: 8-layer, 256-wide versions of the configs, on the CPU "
        "when there is no GPU (the numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        if not args.tiny:
            parser.error("--out is required (a folder for gpu_check.json / .md)")
        import tempfile

        args.out = tempfile.mkdtemp(prefix="gpu-check-tiny-")
    return args


class Report:
    """Numbers as they come, saved after every part (a killed run keeps what it had)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict[str, Any] = {}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, part: str, **values: Any) -> None:
        self.data.setdefault(part, {}).update(values)
        print(f"[{part}] " + json.dumps(values, default=str), flush=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(self.data))

    def run(self, part: str, fn, *args: Any) -> Any:  # noqa: ANN001
        start = time.perf_counter()
        try:
            return fn(self, *args)
        except Exception as exc:  # record and go on to the next part
            self.put(part, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            return None
        finally:
            self.put(part, wall_s=round(time.perf_counter() - start, 1))


def environment(report: Report) -> None:
    import bitsandbytes
    import transformers

    memory = probe_device(DEVICE)
    report.put(
        "environment",
        gpu=memory.name,
        gpu_memory_gib=round(memory.total_bytes / GIB, 1),
        free_gib=round(memory.available_bytes / GIB, 1),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        bitsandbytes=bitsandbytes.__version__,
        python=platform.python_version(),
    )


def hub_config(model_id: str) -> Any:
    from transformers import Qwen2Config

    from tests.test_presets import HUB_CONFIGS  # the published configs, kept beside their test

    values = dict(HUB_CONFIGS[model_id])
    if TINY:
        values.update(num_hidden_layers=8, hidden_size=256, intermediate_size=512)
        values.update(num_attention_heads=4, num_key_value_heads=2)
    return Qwen2Config(**values)


def build_7b(report: Report, preset: str) -> dict[str, Any]:
    """Both models of the preset from their published configs, on the GPU, anchor in nf4."""
    from transformers import AutoModelForCausalLM

    from composer.composition import freeze
    from composer.config import read_recipe
    from composer.quantize import quantize_nf4_in_memory

    config = read_recipe(REPO / preset)
    configs = {role: hub_config(getattr(config, role).model) for role in ("anchor", "specialist")}
    estimate = plan(config, device=DEVICE, model_configs=configs)
    planned = {name: size for name, size, _ in estimate.components}
    report.put(
        "7b",
        preset=preset,
        plan_lines=estimate.format(),
        planned_total_gib=round(estimate.total_bytes / GIB, 2),
    )
    models = {}
    for role in ("anchor", "specialist"):
        before = allocated()
        torch.manual_seed(0)
        dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
        with DEVICE:
            model = AutoModelForCausalLM.from_config(configs[role], dtype=dtype)
        if getattr(config, role).quantization == "nf4":
            replaced = quantize_nf4_in_memory(model, device=DEVICE, compute_dtype=dtype)
            report.put("7b", **{f"{role}_linear4bit_layers": replaced})
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        models[role] = freeze(model)
        weights = allocated() - before
        report.put(
            "7b",
            **{
                f"{role}_weights_gib": round(weights / GIB, 2),
                f"{role}_weights_planned_gib": round(planned[f"{role} weights"] / GIB, 2),
            },
        )
    return {"config": config, "configs": configs, "models": models, "planned": planned}


def _full_length_rows(count: int, length: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows the character tokenizer turns into ``length``+ tokens each (every batch is full)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 +=\n"
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))  # noqa: E731
    return [{"prompt": text(length // 2), "completion": text(length)} for _ in range(count)]


def train_7b(report: Report, built: dict[str, Any], steps: int) -> Any:
    from composer import compose, progress
    from composer.chartok import build_char_tokenizer
    from composer.train import train

    config = built["config"]
    recipe = yaml.safe_load((REPO / report.data["7b"]["preset"]).read_text())
    training = dict(recipe["training"])
    training.update(max_steps=steps, grad_accum=1, logging_every=1, save_every=10_000, eval_every=0)
    if TINY and DEVICE.type == "cpu":  # seconds on a CI machine: only that the code runs
        training.update(max_steps=min(steps, 2), batch_size=2, max_length=64)
    tokenizer = build_char_tokenizer()  # ids < 128: valid in Qwen's 152k vocabulary
    composition = compose(
        built["models"]["anchor"],
        built["models"]["specialist"],
        bridge_config=config.bridge,
        tokenizer=tokenizer,
        specialist_tokenizer=tokenizer,  # one tokenizer; the two vocabularies differ in padding
        recipe=config,
        seed=0,
    )
    bridge_params = sum(p.numel() for p in composition.bridge.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        rows = _full_length_rows(steps * training["batch_size"] + 8, training["max_length"])
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe.update(training=training, data={"train": str(data)})
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        resident = allocated()
        start = time.perf_counter()
        train(recipe, output_dir=Path(tmp) / "run", composition=composition)
        wall = time.perf_counter() - start
        records = progress.read_progress(Path(tmp) / "run")
        reserved = torch.cuda.max_memory_reserved() if DEVICE.type == "cuda" else 0
    peak = max(r["peak_memory_bytes"] for r in records)
    steady = [r["tokens_per_second"] for r in records[2:]] or [records[-1]["tokens_per_second"]]
    report.put(
        "7b",
        bridge_parameters=bridge_params,
        batch=f"{training['batch_size']} x {training['max_length']} tokens",
        gradient_checkpointing=training.get("gradient_checkpointing", False),
        optimizer=training.get("optimizer", "adamw"),
        weights_resident_gib=round(resident / GIB, 2),
        training_peak_gib=round(peak / GIB, 2),
        training_peak_reserved_gib=round(reserved / GIB, 2),  # the allocator's cache too
        training_peak_over_plan=round(peak / (report.data["7b"]["planned_total_gib"] * GIB), 3),
        train_tokens_per_s=round(statistics.median(steady), 1),
        train_s_per_step=round(
            training["batch_size"] * training["max_length"] / statistics.median(steady), 3
        ),
        train_wall_s=round(wall, 1),
        losses=[round(r["loss"], 4) for r in records],
    )
    return composition


def decode(report: Report, composition: Any, new_tokens: int) -> None:
    """Greedy batch-1 decoding: the anchor alone (transformers generate) and the composition."""
    from composer.generate import generate

    torch.manual_seed(0)
    prompt = torch.randint(3, 120, (1, 64), device=DEVICE)
    anchor = composition.anchor

    def anchor_alone(n: int) -> torch.Tensor:
        out = anchor.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return out[:, prompt.shape[1] :]

    def composed(n: int) -> torch.Tensor:
        return generate(composition, prompt, max_new_tokens=n, eos_token_id=[], pad_token_id=0)

    rates = {}
    for name, fn in (("anchor_alone", anchor_alone), ("composed", composed)):
        with torch.no_grad():
            fn(8)  # warm-up: kernels, caches
            synchronize()
            start = time.perf_counter()
            out = fn(new_tokens)
            synchronize()
        assert out.shape[1] == new_tokens, out.shape
        rates[name] = new_tokens / (time.perf_counter() - start)
    report.put(
        "decode",
        new_tokens=new_tokens,
        prompt_tokens=prompt.shape[1],
        anchor_alone_tokens_per_s=round(rates["anchor_alone"], 1),
        composed_tokens_per_s=round(rates["composed"], 1),
        ratio=round(rates["composed"] / rates["anchor_alone"], 3),
    )


def kv_preset(report: Report) -> None:
    """The default preset trained on CUDA (its own precision settings), scored on held-out keys."""
    from composer.loading import load_composition
    from composer.presets import read_preset
    from composer.repro.kv import score_worked
    from composer.train import train

    config = read_preset(REPO / "presets" / "kv-arithmetic.yaml").config
    recipe = config.to_dict()  # paths resolved against the preset's folder
    if TINY:
        recipe["training"].update(max_steps=20, eval_every=0)
        if DEVICE.type == "cpu":
            recipe["training"].update(max_steps=2, save_every=2)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bridge = train(recipe, output_dir=Path(tmp) / "run")
        report.put("kv", train_s=round(time.perf_counter() - start, 1))
        composition = load_composition(recipe, bridge=bridge)
    held_out = [json.loads(line) for line in open(config.data["eval"])]
    held_out = held_out[: 5 if DEVICE.type == "cpu" else 20] if TINY else held_out
    scores = score_worked(composition, held_out)
    report.put(
        "kv",
        held_out_expressions=len(held_out),
        kv_math=scores["KV-MATH"],
        values_written=scores["KV-SUBS"],
    )


def markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = [
        f"## GPU checks ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB), torch {env.get('torch')} "
        f"(CUDA {env.get('cuda')}), transformers {env.get('transformers')}, bitsandbytes "
        f"{env.get('bitsandbytes')}. Command: `python benchmarks/gpu_check.py --out DIR`.",
        "",
        "```json",
        json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "traceback"} for k, v in data.items()},
            indent=2,
            default=str,
        ),
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    global DEVICE, TINY
    configure_cuda_allocator()  # as loading and training do, before CUDA starts
    args = parse_args(argv)
    TINY = args.tiny
    if TINY and not torch.cuda.is_available():
        args.new_tokens = min(args.new_tokens, 8)
    if not torch.cuda.is_available():
        if not TINY:
            print("gpu_check needs a CUDA device; none is visible (--tiny runs on the CPU)")
            return 2
        DEVICE = torch.device("cpu")
    skip = set(filter(None, args.skip.split(",")))
    report = Report(Path(args.out))
    report.run("environment", environment)
    if TINY:
        report.put("environment", tiny=True)
    composition = None
    if "7b" not in skip:
        built = report.run("7b", build_7b, args.preset)
        if built is not None:
            composition = report.run("7b", train_7b, built, args.train_steps)
    if composition is not None and "decode" not in skip:
        report.run("decode", decode, composition, args.new_tokens)
    del composition
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    if "kv" not in skip:
        report.run("kv", kv_preset)
    failed = [part for part, values in report.data.items() if "error" in values]
    print("failed parts:", failed or "none", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
