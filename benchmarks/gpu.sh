#!/usr/bin/env bash
# The accelerator figures of docs/benchmarks.md: convnext_tiny and convnext_base, bfloat16, at
# 224 px, training (batch 256 and 128) and inference, each beside PyTorch eager and
# torch.compile (transformers' ConvNeXt) in the same process (`train` adds our step
# work-matched: Mixup/CutMix, erasing and EMA off); then convnext_tiny and convnext_base
# training with the depthwise 7x7 conv in its shifted form (49 fused multiply-adds forward,
# the row-blocked fused gradients of issue 26 backward) instead of XLA's grouped convolution:
# the rows that decide the GPU's `depthwise_impl` default; then convnext_base with scan and
# with remat='dots_saveable' (the memory/speed trade-off), JAX only.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        (default OUT_DIR: benchmark_results)
#
# Needs jax with CUDA (or on a TPU VM: jax[tpu], without the PyTorch rows' torch.compile),
# torch and transformers, and this package's pure-Python dependencies (flax, optax,
# ml-collections, clu, etils, tensorflow-datasets, which the config checks use to know dataset
# names); TensorFlow is not needed. Writes OUT_DIR/<run>.txt (what was
# printed) and OUT_DIR/<run>.json (every field).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmark_results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c 'import ml_collections, clu, tensorflow_datasets, transformers, torch' 2>/dev/null; then
  echo "gpu.sh: error: install ml-collections, clu, tensorflow-datasets, transformers and torch first" >&2
  exit 1
fi

run() {
  local name=$1
  shift
  python -m convnext_jax.benchmark "$@" --dtype bfloat16 --size 224 \
    --warmup 3 --iters 10 --json "$out/$name.json" 2>&1 | grep -v '^[IWE][0-9]\{4\} ' |
    tee "$out/$name.txt"
}

run tiny_train train --model convnext_tiny --batch 256 --compare torch
run base_train train --model convnext_base --batch 128 --compare torch
run tiny_infer infer --model convnext_tiny --batch 256 --compare torch
run base_infer infer --model convnext_base --batch 128 --compare torch
run tiny_train_shift train --model convnext_tiny --batch 256 --depthwise-impl shift
run base_train_shift train --model convnext_base --batch 128 --depthwise-impl shift
run base_train_scan train --model convnext_base --batch 128 --scan
run base_train_dots train --model convnext_base --batch 128 --remat dots_saveable
