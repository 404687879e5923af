"""Training throughput and peak memory: CALM bridge vs LoRA vs a naive all-autograd composition.

Same machine, same run, same random-weight models built from configs, same token batches:

- bridge: the composition as composer trains it (frozen models, the specialist without autograd,
  autograd only from the lowest connected anchor layer up);
- lora: peft LoRA on the same anchor, its rank chosen so it trains about as many parameters as
  the bridge (attention and MLP projections of every layer);
- naive: the same composition, but every frozen weight keeps requires_grad=True and the
  specialist runs with autograd (what a composition that does not scope its gradients costs);
  only the bridge is stepped.

Each method runs in a fresh process, so peak memory is its own: on a CPU the peak resident set
(VmHWM) and its growth over the process after the models are built; on CUDA
``torch.cuda.max_memory_allocated``. Prints a markdown table; ``--write`` appends it to
docs/BENCHMARKS.md with the machine named.

    .venv/bin/python benchmarks/train_throughput.py            # small default, < 3 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --anchor-width 1024 --anchor-layers 16 --write
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _machine import append_to_benchmarks  # noqa: E402

METHODS = ("bridge", "lora", "naive")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor-layers", type=int, default=8)
    parser.add_argument("--anchor-width", type=int, default=384)
    parser.add_argument("--specialist-layers", type=int, default=8)
    parser.add_argument("--specialist-width", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--every", type=int, default=4, help="bridge.every (paper: 4)")
    parser.add_argument("--bridge-heads", type=int, default=None, help="None: the anchor's")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on a CPU (1: stable numbers on a shared machine, where spinning "
        "threads of busy cores can be 20x slower; 0: torch's default)",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--write", action="store_true", help="append to docs/BENCHMARKS.md")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="seconds at toy size (2 layers, width 64/32, 16 tokens, 1 step per method): CI checks "
        "that every column still runs; its numbers mean nothing and are never written",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.anchor_layers, args.anchor_width, args.every = 2, 64, 1
        args.specialist_layers, args.specialist_width, args.vocab = 2, 32, 128
        args.batch_size, args.seq_len, args.steps, args.warmup = 2, 16, 1, 0
        args.write = False
    return args


# ---------------------------------------------------------------------------------------------
# Inside each child process


def _rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (kB -> bytes); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _models(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    def config(cls: Any, width: int, layers: int) -> Any:
        heads = max(1, width // 64)
        return cls(
            vocab_size=args.vocab,
            hidden_size=width,
            intermediate_size=int(8 * width / 3) // 64 * 64 or 2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2) if heads % 2 == 0 else heads,
            max_position_embeddings=max(2048, args.seq_len),
            tie_word_embeddings=False,
        )

    torch.manual_seed(0)
    anchor = LlamaForCausalLM(config(LlamaConfig, args.anchor_width, args.anchor_layers))
    torch.manual_seed(1)
    specialist = Qwen2ForCausalLM(
        config(Qwen2Config, args.specialist_width, args.specialist_layers)
    )
    return anchor.eval(), specialist.eval()


def _bridge_config(args: argparse.Namespace) -> Any:
    from composer.config import BridgeConfig

    return BridgeConfig(every=args.every, num_heads=args.bridge_heads)


def _naive_composition(anchor: Any, specialist: Any, args: argparse.Namespace) -> Any:
    """The composition with autograd everywhere: the specialist is not run under no_grad."""
    import torch

    from composer.composition import Composition, compose
    from composer.hooks import forward_hooks, hidden_of

    class NaiveComposition(Composition):
        def specialist_states(self, input_ids, common, *, real=None, cache=None):  # noqa: ANN001, ANN202
            """The parent's, with autograd through the specialist (no no_grad, no cache)."""
            _, specialist, _, layers = self._frozen
            captured: dict[int, torch.Tensor] = {}
            needed = sorted({s for _, s in self.bridge.pairs})

            def capture(j: int):  # noqa: ANN202
                return lambda module, inputs, output: captured.__setitem__(j, hidden_of(output))

            with forward_hooks([(layers[j], capture(j)) for j in needed]):
                specialist.base_model(input_ids=input_ids, use_cache=False, **common)
            return [captured[s] for _, s in self.bridge.pairs]

    composed = compose(anchor, specialist, bridge_config=_bridge_config(args), seed=0)
    naive = NaiveComposition(anchor, specialist, composed.bridge)
    anchor.requires_grad_(True)  # gradients for every frozen weight, never stepped
    specialist.requires_grad_(True)
    return naive


def _lora_rank(anchor: Any, target: int) -> int:
    """The LoRA rank whose parameter count is closest to ``target`` (at least 1)."""
    from torch import nn

    per_rank = sum(
        m.in_features + m.out_features
        for name, m in anchor.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    )
    return max(1, round(target / per_rank))


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, train ``method`` for warmup + steps, measure (runs in a child process)."""
    import torch

    from composer.composition import bridge_shape_for, compose

    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    anchor, specialist = _models(args)
    shape = bridge_shape_for(anchor.config, specialist.config, _bridge_config(args))
    bridge_count = shape.num_parameters()
    anchor.to(device)
    specialist.to(device)
    if method == "bridge":
        model = compose(anchor, specialist, bridge_config=_bridge_config(args), seed=0)
        params = list(model.bridge.parameters())
        extra = ""
    elif method == "naive":
        model = _naive_composition(anchor, specialist, args)
        params = list(model.bridge.parameters())
        extra = "all weights require grad; only the bridge is stepped"
    else:
        from peft import LoraConfig, get_peft_model

        rank = _lora_rank(anchor, bridge_count)
        model = get_peft_model(
            anchor, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
        )
        params = [p for p in model.parameters() if p.requires_grad]
        extra = f"rank {rank}"
    model.to(device)
    model.train()
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(4, args.vocab, (args.batch_size, args.seq_len), generator=generator)
        for _ in range(args.warmup + args.steps)
    ]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _rss_bytes("VmRSS")

    def step(ids: torch.Tensor) -> None:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for ids in batches[: args.warmup]:
        step(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for ids in batches[args.warmup :]:
        step(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_bytes("VmHWM")
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "trainable": trainable,
        "tokens_per_second": args.steps * args.batch_size * args.seq_len / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_bytes": peak,
        "above_setup_bytes": peak - baseline,
        "note": extra,
    }


def _child(method: str, args: argparse.Namespace, queue: Any) -> None:
    try:
        queue.put(run_method(method, args))
    except BaseException as exc:  # reported by the parent
        queue.put({"method": method, "error": f"{type(exc).__name__}: {exc}"})


# ---------------------------------------------------------------------------------------------
# The parent: one process per method, then the table


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, CPU"


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    mib = 1024**2
    lines = [
        "| method | trainable params | tokens/s | s/step | peak memory (MiB) | "
        "growth in training (MiB) | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | | | | | | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['tokens_per_second']:,.0f} | "
            f"{r['seconds_per_step']:.3f} | {r['peak_bytes'] / mib:,.0f} | "
            f"{r['above_setup_bytes'] / mib:,.0f} | {r['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
        return 2
    context = multiprocessing.get_context("spawn")
    results = []
    for method in methods:
        queue = context.Queue()
        child = context.Process(target=_child, args=(method, args, queue))
        child.start()
        results.append(queue.get())
        child.join()
        print(f"{method}: done", file=sys.stderr)
    import torch

    cuda = torch.cuda.is_available()
    memory = "torch.cuda.max_memory_allocated" if cuda else "peak RSS"
    threads = (
        "bf16 autocast" if cuda else f"fp32, {args.threads or torch.get_num_threads()} thread(s)"
    )
    header = (
        f"anchor Llama {args.anchor_layers} x {args.anchor_width}, specialist Qwen2 "
        f"{args.specialist_layers} x {args.specialist_width}, vocab {args.vocab}, bridge every "
        f"{args.every}; batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps "
        f"after {args.warmup}; {threads}; memory: {memory} of a fresh process per method"
    )
    text = table(results, args)
    print(header)
    print()
    print(text)
    failed = [r["method"] for r in results if "error" in r]
    if args.tiny and failed:  # CI's check that no column has rotted
        print(f"failed in tiny mode: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.write:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        command = "python benchmarks/train_throughput.py " + " ".join(argv or sys.argv[1:])
        section = (
            f"\n## Bridge training throughput ({stamp}, {machine_name()})\n\n"
            f"`{command.strip()}`: {header}.\n\n{text}\n"
        )
        append_to_benchmarks(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
