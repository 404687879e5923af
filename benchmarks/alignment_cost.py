"""The cost of two tokenizers: composing models that read the same text through different
tokenizers (composer.alignment) next to a same-tokenizer composition of the same model sizes.

Pairs, all on the same text (the repo's docs, cut to printable ASCII) and built offline: a
byte-level BPE trained here (``composer.chartok.build_bpe_tokenizer``) and the character tokenizer
(``build_char_tokenizer``). Each two-tokenizer pair is compared with the same-tokenizer pair that
has the same anchor tokenizer, so the anchor reads identical token rows in both:

  bpe+bpe    baseline: one BPE for both models (no alignment)
  bpe+bpe2   anchor on the BPE, specialist on a second BPE (another vocabulary size): alignment
             with about as many specialist tokens as anchor tokens (the aligner's own cost)
  bpe+char   anchor on the BPE, specialist on characters (~3-4 specialist tokens per anchor one)
  char+char  baseline for the reverse order
  char+bpe   anchor on characters, specialist on the BPE

Measured, all pairs interleaved round by round so a busy machine slows each alike:
  (1) a training step: forward + backward + AdamW step on the bridge, a batch of rows of
      ``--seq-len`` anchor tokens (median of ``--steps`` after ``--warmup``);
  (2) greedy decode tokens/s with cache, ``composition.generate(..., eos_token_id=[])``
      (median of ``--decode-runs``). A random-weight anchor left alone writes degenerate text
      ("save save save", one 40-letter word) that starves or floods the specialist, so a hook on
      the anchor's output head adds +1e4 to the logit of the text's next token: greedy decoding
      then writes the corpus continuation through the unchanged generate() path, and the
      specialist reads real text in every pair.
Both clocks are kept: process CPU time (the headline: with one torch thread it is the work done,
and it hardly moves when other jobs share the cores) and wall time.
Where the time goes: the script times ``aligned_tokens`` (the RowAligner pushes: tokenizer calls
in Python) and the specialist's forward inside every step, and counts the specialist tokens and
their padding. Models are random-weight Llama (anchor) / Qwen2 (specialist) built from configs.

    .venv/bin/python benchmarks/alignment_cost.py                 # ~3 min on 2 busy cores
    .venv/bin/python benchmarks/alignment_cost.py --profile       # + cProfile of the aligner
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import append_to_benchmarks, describe  # noqa: E402

import composer.aligned_reading as reading_module  # noqa: E402
from composer import compose  # noqa: E402
from composer.chartok import DEFAULT_ALPHABET, build_bpe_tokenizer, build_char_tokenizer  # noqa: E402
from composer.config import BridgeConfig  # noqa: E402

# (name, anchor tokenizer, specialist tokenizer, its same-tokenizer baseline)
PAIRS = (
    ("bpe+bpe", "bpe", "bpe", None),
    ("bpe+bpe2", "bpe", "bpe2", "bpe+bpe"),
    ("bpe+char", "bpe", "char", "bpe+bpe"),
    ("char+char", "char", "char", None),
    ("char+bpe", "char", "bpe", "char+char"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--anchor", default="384x8", help="WIDTHxLAYERS of the anchor (Llama)")
    parser.add_argument(
        "--specialist", default="192x8", help="WIDTHxLAYERS of the specialist (Qwen2)"
    )
    parser.add_argument("--bpe-vocab", type=int, default=2048, help="the BPE's vocabulary")
    parser.add_argument("--bpe2-vocab", type=int, default=1024, help="the second BPE's")
    parser.add_argument("--every", type=int, default=4, help="bridge.every")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=192, help="anchor tokens per row")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per pair")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--decode-runs", type=int, default=3, help="timed decodes per pair")
    parser.add_argument("--pairs", default=",".join(p[0] for p in PAIRS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile one batch through the aligner"
    )
    parser.add_argument(
        "--write", action="store_true", help="append the tables to docs/BENCHMARKS.md"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="seconds at toy size (64x2 / 32x2, 16-token rows, 1 step, 4 new tokens): CI checks "
        "that the script still runs; its numbers mean nothing and are never written",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.anchor, args.specialist, args.every = "64x2", "32x2", 1
        args.bpe_vocab, args.bpe2_vocab = 300, 280
        args.batch_size, args.seq_len, args.steps, args.warmup = 2, 16, 1, 0
        args.prompt_tokens, args.new_tokens, args.decode_runs = 4, 4, 1
        args.write = False
    return args


# ---------------------------------------------------------------------------------------------
# Text, tokenizers, models


def corpus() -> list[str]:
    """The repo's docs as paragraphs of printable ASCII (the char tokenizer's alphabet)."""
    allowed = set(DEFAULT_ALPHABET)
    texts = []
    for path in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append("".join(c if c in allowed else " " for c in text))
    if not texts:  # a stripped checkout: any fixed ASCII text will do
        texts = ["The anchor reads the text; the specialist reads the same text. " * 400]
    return texts


def tokenizers(texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "bpe": build_bpe_tokenizer(texts, vocab_size=args.bpe_vocab),
        "bpe2": build_bpe_tokenizer(texts, vocab_size=args.bpe2_vocab),
        "char": build_char_tokenizer(),
    }


def script_head(anchor: Any, script: list[int]) -> Any:
    """Make greedy decoding write ``script`` (see the docstring); returns the step counter."""
    state = {"calls": 0}

    def hook(module: Any, args: Any, logits: torch.Tensor) -> torch.Tensor:
        if state["calls"] < len(script):
            logits = logits.clone()
            logits[:, -1, script[state["calls"]]] += 1e4
        state["calls"] += 1
        return logits

    anchor.get_output_embeddings().register_forward_hook(hook)
    return state


def build(cls: Any, config_cls: Any, shape: str, vocab: int, seed: int) -> Any:
    width, layers = map(int, shape.split("x"))
    heads = max(1, width // 64)
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(8 * width / 3) // 64 * 64 or 2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2) if heads % 2 == 0 else heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    return cls(config).eval()


def rows_for(tokenizer: Any, texts: list[str], args: argparse.Namespace) -> list[torch.Tensor]:
    """Training batches of anchor rows: BOS + seq_len - 1 tokens of the text, cut in order."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids
    per_row = args.seq_len - 1
    n_rows = (args.warmup + args.steps) * args.batch_size
    rows = []
    for r in range(n_rows):
        start = (r * per_row) % max(1, len(ids) - per_row)
        rows.append([tokenizer.bos_token_id, *ids[start : start + per_row]])
    batches = [
        torch.tensor(rows[i : i + args.batch_size], dtype=torch.long)
        for i in range(0, n_rows, args.batch_size)
    ]
    return batches


# ---------------------------------------------------------------------------------------------
# Timing


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class Meter:
    """Seconds spent in the aligner and in the specialist's forward, and specialist tokens."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.aligner = 0.0
        self.specialist = 0.0
        self.specialist_slots = 0  # committed tokens + padding, as run through the specialist
        self.specialist_real = 0


METER: Meter | None = None  # the meter of the pair being timed now


def _timed_aligned_tokens(original: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        out = original(*args, **kwargs)
        if METER is not None:
            METER.aligner += time.process_time() - start
        return out

    return wrapper


def instrument(composition: Any, meter: Meter) -> None:
    """Time the specialist's forward of this composition (bound method, this instance only)."""
    original = composition.specialist_states

    def wrapper(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        out = original(input_ids, *args, **kwargs)
        meter.specialist += time.process_time() - start
        meter.specialist_slots += input_ids.numel()
        real = kwargs.get("real")
        meter.specialist_real += int(real.sum()) if real is not None else input_ids.numel()
        return out

    composition.specialist_states = wrapper


class Pair:
    def __init__(self, name: str, anchor_tok: str, specialist_tok: str, baseline: str | None):
        self.name, self.anchor_tok, self.specialist_tok = name, anchor_tok, specialist_tok
        self.baseline = baseline
        self.meter = Meter()
        self.step_seconds: list[float] = []  # CPU time
        self.step_wall: list[float] = []
        self.step_aligner: list[float] = []
        self.step_specialist: list[float] = []
        self.slots = self.real = 0
        self.decode_tps: list[float] = []  # per CPU second
        self.decode_wall_tps: list[float] = []
        self.decode_aligner: list[float] = []
        self.decode_specialist: list[float] = []


def setup(pair: Pair, toks: dict[str, Any], texts: list[str], args: argparse.Namespace) -> None:
    a_tok, s_tok = toks[pair.anchor_tok], toks[pair.specialist_tok]
    anchor = build(LlamaForCausalLM, LlamaConfig, args.anchor, len(a_tok), seed=0)
    specialist = build(Qwen2ForCausalLM, Qwen2Config, args.specialist, len(s_tok), seed=1)
    pair.composition = compose(
        anchor,
        specialist,
        bridge_config=BridgeConfig(every=args.every),
        tokenizer=a_tok,
        specialist_tokenizer=s_tok,
        seed=0,
    )
    two = pair.anchor_tok != pair.specialist_tok
    assert (pair.composition.alignment is not None) == two, pair.name
    instrument(pair.composition, pair.meter)
    pair.batches = rows_for(a_tok, texts, args)
    pair.optimizer = torch.optim.AdamW(pair.composition.bridge.parameters(), lr=1e-4)
    row = pair.batches[-1][0]
    pair.prompt = row[None, : args.prompt_tokens]
    pair.script = row[args.prompt_tokens : args.prompt_tokens + args.new_tokens].tolist()
    assert len(pair.script) == args.new_tokens, "--seq-len must cover prompt + new tokens"
    pair.head_calls = script_head(anchor, pair.script)


def train_step(pair: Pair, ids: torch.Tensor) -> tuple[float, float]:
    """(wall, CPU) seconds of one training step."""
    global METER
    METER = pair.meter
    pair.meter.reset()
    composition = pair.composition
    composition.train()
    wall, cpu = clocks()
    loss = composition(input_ids=ids, labels=ids).loss
    loss.backward()
    pair.optimizer.step()
    pair.optimizer.zero_grad(set_to_none=True)
    wall_end, cpu_end = clocks()
    METER = None
    return wall_end - wall, cpu_end - cpu


def decode(pair: Pair, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds of greedy decoding n tokens (the scripted text)."""
    global METER
    METER = pair.meter
    pair.meter.reset()
    pair.composition.eval()
    pair.head_calls["calls"] = 0
    wall, cpu = clocks()
    out = pair.composition.generate(pair.prompt, max_new_tokens=n, eos_token_id=[])
    wall_end, cpu_end = clocks()
    METER = None
    assert out[0].tolist() == pair.script[:n], "the scripted anchor did not write its text"
    return wall_end - wall, cpu_end - cpu


def profile_aligner(pair: Pair, top: int = 12) -> str:
    """cProfile the aligner over one training batch: where a push spends its time."""
    from composer.alignment import aligned_tokens

    alignment = pair.composition.alignment
    ids = pair.batches[0]
    rows = [alignment.row() for _ in range(len(ids))]
    profiler = cProfile.Profile()
    profiler.enable()
    aligned_tokens(rows, ids, torch.ones_like(ids), column_offset=0, pad_id=alignment.pad_id)
    profiler.disable()
    stream = __import__("io").StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
    stats.print_stats(top)
    return stream.getvalue()


# ---------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [p.strip() for p in args.pairs.split(",") if p.strip()]
    known = {p[0]: p for p in PAIRS}
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        print(f"unknown pair(s) {unknown}; expected some of {', '.join(known)}")
        return 2
    for name in list(wanted):  # a two-tokenizer pair needs its baseline
        base = known[name][3]
        if base and base not in wanted:
            wanted.insert(0, base)
    reading_module.aligned_tokens = _timed_aligned_tokens(reading_module.aligned_tokens)
    texts = corpus()
    toks = tokenizers(texts, args)
    pairs = [Pair(*known[name]) for name in [p[0] for p in PAIRS] if name in wanted]
    for pair in pairs:
        setup(pair, toks, texts, args)
    print("models built", file=sys.stderr)

    # (1) training steps, pairs interleaved round by round
    for i in range(args.warmup + args.steps):
        for pair in pairs:
            wall, cpu = train_step(pair, pair.batches[i])
            if i >= args.warmup:
                pair.step_seconds.append(cpu)
                pair.step_wall.append(wall)
                pair.step_aligner.append(pair.meter.aligner)
                pair.step_specialist.append(pair.meter.specialist)
                pair.slots, pair.real = pair.meter.specialist_slots, pair.meter.specialist_real
    print("training timed", file=sys.stderr)

    # (2) greedy decoding with cache, interleaved the same way
    for pair in pairs:
        with torch.no_grad():  # a trained-looking bridge: non-zero outputs, nothing skipped
            for p in pair.composition.bridge.parameters():
                p.normal_(0, 0.02)
        decode(pair, min(4, args.new_tokens))  # warm-up
    for _ in range(args.decode_runs):
        for pair in pairs:
            wall, cpu = decode(pair, args.new_tokens)
            pair.decode_tps.append(args.new_tokens / cpu)
            pair.decode_wall_tps.append(args.new_tokens / wall)
            pair.decode_aligner.append(pair.meter.aligner)
            pair.decode_specialist.append(pair.meter.specialist)
    print("decoding timed", file=sys.stderr)

    by_name = {p.name: p for p in pairs}
    med = statistics.median
    n = args.new_tokens
    tokens_per_batch = args.batch_size * args.seq_len
    train_lines = [
        "| pair (anchor+specialist) | specialist tokens per anchor token | specialist padding | "
        "CPU s/step | vs same tokenizer | of which aligner | specialist forward | rest | "
        "wall s/step | wall vs same |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    decode_lines = [
        "| pair (anchor+specialist) | tokens per CPU s | vs same tokenizer | aligner ms/token | "
        "specialist forward ms/token | rest ms/token | tokens per wall s | wall vs same |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = []

    def versus(value: float, base: float | None) -> str:
        return f"{value / base:.2f}x" if base else "1 (baseline)"

    for p in pairs:
        base = by_name[p.baseline] if p.baseline else None
        step, wall = med(p.step_seconds), med(p.step_wall)
        aligner, spec = med(p.step_aligner), med(p.step_specialist)
        padding = 1 - p.real / p.slots if p.slots else 0.0
        train_lines.append(
            f"| {p.name} | {p.real / tokens_per_batch:.2f} | {padding:.0%} | {step:.3f} | "
            f"{versus(step, base and med(base.step_seconds))} | {aligner:.3f} | {spec:.3f} | "
            f"{step - aligner - spec:.3f} | {wall:.3f} | "
            f"{versus(wall, base and med(base.step_wall))} |"
        )
        tps, wall_tps = med(p.decode_tps), med(p.decode_wall_tps)
        a_ms, s_ms = med(p.decode_aligner) * 1000 / n, med(p.decode_specialist) * 1000 / n
        decode_lines.append(
            f"| {p.name} | {tps:.1f} | {versus(tps, base and med(base.decode_tps))} | "
            f"{a_ms:.2f} | {s_ms:.2f} | {1000 / tps - a_ms - s_ms:.2f} | {wall_tps:.1f} | "
            f"{versus(wall_tps, base and med(base.decode_wall_tps))} |"
        )
        if base:
            ratios.append(
                f"{p.name} vs {base.name}: training step {step / med(base.step_seconds):.2f}x "
                f"the CPU time (wall {wall / med(base.step_wall):.2f}x), decode tokens/s "
                f"{tps / med(base.decode_tps):.2f}x "
                f"(wall {wall_tps / med(base.decode_wall_tps):.2f}x)"
            )
    header = (
        f"Anchor Llama {args.anchor}, specialist Qwen2 {args.specialist} (WIDTHxLAYERS), random "
        f"weights, vocabularies the tokenizers' (BPE {args.bpe_vocab}, second BPE "
        f"{args.bpe2_vocab}, characters {len(toks['char'])}); bridge every {args.every}. "
        f"Training: batch {args.batch_size} x {args.seq_len} anchor tokens, median of "
        f"{args.steps} steps after {args.warmup}. Decoding: greedy, batch 1, "
        f"{args.prompt_tokens}-token prompt, {n} new tokens (the text's continuation, scripted "
        f"head), median of {args.decode_runs} runs. "
        f"fp32, {args.threads or torch.get_num_threads()} torch thread(s)."
    )
    summary = (
        "Two tokenizers vs one (target: within 15%: training step <= 1.15x, "
        "decode tokens/s >= 0.85x):"
    )
    text = "\n".join(
        [
            header,
            "",
            "Training step:",
            "",
            *train_lines,
            "",
            "Greedy decoding with cache:",
            "",
            *decode_lines,
            "",
            summary,
            *[f"- {r}" for r in ratios],
        ]
    )
    print(f"Machine: {describe()}")
    print(text)
    if args.profile:
        for p in pairs:
            if p.composition.alignment is not None:
                print(f"\ncProfile of the aligner over one {p.name} batch:\n")
                print(profile_aligner(p))
    if args.write:
        command = "python benchmarks/alignment_cost.py " + " ".join(argv or sys.argv[1:])
        section = (
            f"\n## Two tokenizers: the cost of alignment ({time.strftime('%Y-%m-%d')})\n\n"
            f"Machine: {describe()}. Command: `{command.strip()}`.\n\n{text}\n"
        )
        append_to_benchmarks(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
