#!/usr/bin/env bash
# The prepared GPU benchmark: our engine against transformers' generate on RecurrentGemma-2B
# shapes (random bfloat16 weights), batch 64 and 256, 2048-token prompts, 1024 new tokens;
# tokens/s at output lengths 1k-8k; memory per slot. Prints one JSON line (also written to
# $OUT/gpu.json when OUT is set). What it measures and how: benchmarks/bench_gpu.py.
#
# For one machine with a GPU where JAX (CUDA), PyTorch, transformers, flax and sentencepiece
# are installed and nothing can be downloaded. griffin_batch is imported from this working
# tree (no install). Other modules it needs and the machine lacks are named in the JSON
# line's "missing_modules"; vendor them here first, then they travel with the tree:
#   pip install --no-deps --target .gpu_deps einops jaxtyping wadler-lindig
# (.gpu_deps/ is git-ignored: carry it to the machine explicitly.)
#
# Usage, from anywhere: benchmarks/gpu.sh [--budget-s 450] [--smoke]
# Ends within 8 minutes: the Python side keeps to --budget-s (default 450 s) and skips or
# shortens phases that would overrun (named in "skipped"); `timeout` is only a backstop.
set -euo pipefail
cd "$(dirname "$0")/.."

# transformers must not reach the Hub, for kernels or anything else.
export USE_HUB_KERNELS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .gpu_deps ]; then
  export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
exec timeout --kill-after=10 480 "$PYTHON" benchmarks/bench_gpu.py "$@"
