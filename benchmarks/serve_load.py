"""Requests per second and time to first token of `calm-composer serve` under 1 and N clients.

Starts the real server (`python -m composer.cli serve`, its own process) on the default preset
with a trained bridge (presets/bridges/kv-arithmetic when it is there, else a bridge with seeded
random weights: the same amount of work per token), then sends streamed chat completions from
1 and from N concurrent `openai` clients, greedy, held-out prompts. Requests are served one at
a time (one model), so with N clients the time to first token includes the wait in the queue.
Usage:
  python benchmarks/serve_load.py [--clients 1 8] [--requests 4] [--max-tokens 16] [--write]
  python benchmarks/serve_load.py --tiny   # 1 and 2 clients, 1 request, 4 tokens, a free port
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "kv-arithmetic.yaml"
SHIPPED_BRIDGE = ROOT / "presets" / "bridges" / "kv-arithmetic"
NAME = "kv"


def random_bridge(folder: Path) -> Path:
    """A bridge for the default preset with seeded random weights, saved to ``folder``."""
    import torch

    from composer.loading import load_composition

    composition = load_composition(PRESET, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in composition.bridge.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    composition.save_bridge(str(folder))
    return folder


def start_server(bridge: Path, port: int, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "composer.cli", "serve", str(PRESET), "--bridge", str(bridge)]
    command += ["--port", str(port), "--model-name", NAME]
    env = dict(os.environ)
    if threads:  # torch's intra-op threads in the server (OpenMP)
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        time.sleep(0.5)
    process.terminate()
    raise SystemExit("the server did not answer within 300 s")


def one_request(client, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streamed chat completion."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return (total if first is None else first), total, tokens


def load(url: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        for r in range(requests):
            result = one_request(client, prompts[(k * requests + r) % len(prompts)], max_tokens)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "latency_p50_s": statistics.median(r[1] for r in results),
    }


def exact_answers(url: str, rows: list[dict], model: str, max_tokens: int) -> tuple[int, int]:
    """How many held-out rows ``model`` answers exactly (greedy), over completions and chat."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    text = chat = 0
    for row in rows:
        ask = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        reply = client.completions.create(prompt=row["prompt"], **ask).choices[0].text
        said = (
            client.chat.completions.create(
                messages=[{"role": "user", "content": row["prompt"]}], **ask
            )
            .choices[0]
            .message.content
        )
        text += reply.strip() == row["completion"]
        chat += (said or "").strip() == row["completion"]
    return text, chat


def markdown(rows: list[dict], *, bridge: str, max_tokens: int, machine: str) -> str:
    lines = [
        f"## OpenAI-compatible server under load ({date.today().isoformat()})",
        "",
        f"Machine: {machine}. Command: `python benchmarks/serve_load.py` (`calm-composer serve` "
        f"in its own process, the default preset with {bridge}; streamed chat completions, "
        f"greedy, up to {max_tokens} new tokens, held-out prompts, each client sending its "
        "requests one after another). One model serves one request at a time: with more "
        "clients the time to first token includes the wait in the queue.",
        "",
        "| clients | requests | requests/s | tokens/s | time to first token p50 / p90 (s) | "
        "request latency p50 (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['requests']} | {row['requests_per_s']:.2f} | "
            f"{row['tokens_per_s']:.1f} | {row['ttft_p50_s']:.3f} / {row['ttft_p90_s']:.3f} | "
            f"{row['latency_p50_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--bridge", help="bridge folder (default: the shipped one, else random)")
    parser.add_argument(
        "--threads", type=int, help="torch threads in the server (default: torch's choice)"
    )
    parser.add_argument(
        "--check", type=int, default=20, help="held-out prompts scored on each model (exact)"
    )
    parser.add_argument("--write", action="store_true", help="append to docs/BENCHMARKS.md")
    parser.add_argument(
        "--tiny", action="store_true", help="check the script: seconds, a free port, no --write"
    )
    args = parser.parse_args()
    if args.tiny:
        import socket

        with socket.socket() as probe:  # a port nobody else is using now
            probe.bind(("127.0.0.1", 0))
            args.port = probe.getsockname()[1]
        args.clients, args.requests, args.max_tokens, args.check = [1, 2], 1, 4, 2
        args.write = False

    held_out = PRESET.parent / "data" / "kv-arithmetic-heldout.jsonl"
    rows = [json.loads(line) for line in held_out.open(encoding="utf-8")]
    prompts = [row["prompt"] for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        if args.bridge:
            bridge, about = Path(args.bridge), f"the bridge in {args.bridge}"
        elif (SHIPPED_BRIDGE / "bridge_config.json").is_file():
            bridge, about = SHIPPED_BRIDGE, "its shipped trained bridge"
        else:
            bridge = random_bridge(Path(tmp) / "bridge")
            about = "a bridge of seeded random weights (the shipped one was not there yet)"
        server = start_server(bridge, args.port, args.threads)
        try:
            url = f"http://127.0.0.1:{args.port}/v1"
            load(url, prompts, 1, 2, args.max_tokens)  # warm-up
            results = [
                load(url, prompts, clients, args.requests, args.max_tokens)
                for clients in args.clients
            ]
            checked = {
                model: exact_answers(url, rows[: args.check], model, args.max_tokens)
                for model in (NAME, NAME + ":anchor")
            }
        finally:
            server.terminate()
            server.wait(timeout=60)
    machine = describe()  # this process; the server's threads are said next
    machine += f"; server with OMP_NUM_THREADS={args.threads}" if args.threads else ""
    machine += ", load average {:.1f} / {:.1f} / {:.1f} at the end (other jobs included)".format(
        *os.getloadavg()
    )
    text = markdown(results, bridge=about, max_tokens=args.max_tokens, machine=machine)
    for model, (text_ok, chat_ok) in checked.items():
        text += (
            f"\n`{model}`: {text_ok}/{args.check} of the first held-out prompts answered exactly "
            f"over /v1/completions, {chat_ok}/{args.check} over /v1/chat/completions.\n"
        )
    print(text)
    if args.write:
        with open(ROOT / "docs" / "BENCHMARKS.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
