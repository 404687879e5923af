"""Tokens per second of composed greedy decoding next to the anchor alone and to recomputing.

Three ways to produce the same number of new tokens, same models, same machine, same run:
  anchor alone     transformers' generate (KV cache), the speed to match
  composed         co-decoding with separate caches + per-block key/value caches
  recompute        composed, both models re-run over the whole sequence every token (what the
                   official CALM tutorial does with caching turned off)
Models are built from configs with random weights (speed does not depend on the values); the
specialist is about a quarter of the anchor. Usage:
  python benchmarks/decode_speed.py [--new-tokens 256] [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from composer import compose  # noqa: E402
from composer.config import BridgeConfig  # noqa: E402


def build(width: int, layers: int, heads: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(width * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(config).eval()


def non_embedding_params(model: torch.nn.Module) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def timed(fn) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--anchor", default="768x12", help="WIDTHxLAYERS of the anchor")
    parser.add_argument("--specialist", default="384x12", help="WIDTHxLAYERS of the specialist")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--skip-recompute", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--write", action="store_true", help="append the table to docs/BENCHMARKS.md"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a few seconds at toy size (anchor 64x2, specialist 32x2, 8 tokens): CI checks that "
        "the script still runs; its numbers mean nothing and are never written",
    )
    args = parser.parse_args()
    if args.tiny:
        args.anchor, args.specialist, args.vocab = "64x2", "32x2", 128
        args.new_tokens, args.prompt_tokens, args.write = 8, 4, False

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    aw, al = map(int, args.anchor.split("x"))
    sw, sl = map(int, args.specialist.split("x"))
    anchor = build(aw, al, max(1, aw // 64), args.vocab, seed=0).to(device)
    specialist = build(sw, sl, max(1, sw // 64), args.vocab, seed=1).to(device)
    composition = compose(
        anchor, specialist, bridge_config=BridgeConfig(every=1 if args.tiny else 4)
    )
    with torch.no_grad():  # a trained-looking bridge: non-zero outputs, so nothing is skipped
        for p in composition.bridge.parameters():
            p.normal_(0, 0.02)
    prompt = torch.randint(3, args.vocab, (1, args.prompt_tokens), device=device)
    n = args.new_tokens
    kwargs = dict(max_new_tokens=n, eos_token_id=[])

    composition.generate(prompt, max_new_tokens=4, eos_token_id=[])  # warm-up
    anchor.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    t_anchor, _ = timed(
        lambda: anchor.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    )
    t_composed, cached = timed(lambda: composition.generate(prompt, **kwargs))
    rows = [
        ("anchor alone (transformers generate, cache)", n / t_anchor),
        ("composed, co-decoding with caches", n / t_composed),
    ]
    if not args.skip_recompute:
        t_recompute, uncached = timed(
            lambda: composition.generate(prompt, use_cache=False, **kwargs)
        )
        rows.append(("composed, recompute everything each token", n / t_recompute))
        assert torch.equal(cached, uncached), "cached and uncached decoding differ"

    ratio = rows[1][1] / rows[0][1]
    size_ratio = non_embedding_params(specialist) / non_embedding_params(anchor)
    lines = [
        f"### Decode speed ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {describe()}. Command: `python benchmarks/decode_speed.py "
        f"--new-tokens {n} --anchor {args.anchor} --specialist {args.specialist}"
        f"{f' --threads {args.threads}' if args.threads else ''}`.",
        f"Anchor Llama {args.anchor} ({non_embedding_params(anchor) / 1e6:.1f}M non-embedding), "
        f"specialist {args.specialist} ({non_embedding_params(specialist) / 1e6:.1f}M, "
        f"{size_ratio:.2f}x the anchor), vocab {args.vocab}, {len(composition.pairs)} blocks, "
        f"{args.prompt_tokens}-token prompt, {n} new tokens, greedy, batch 1.",
        "",
        "| decoding | tokens/s | vs anchor alone |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {speed:.1f} | {speed / rows[0][1]:.2f}x |" for name, speed in rows]
    lines += ["", f"Composed / anchor alone: {ratio:.2f}x (target >= 0.75x).", ""]
    table = "\n".join(lines)
    print(table)
    if args.write:
        out = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
        if not out.exists():
            out.write_text(
                "# Benchmarks\n\nNumbers from the scripts in benchmarks/, machine named.\n\n"
            )
        with out.open("a", encoding="utf-8") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
