#!/usr/bin/env bash
# Issue 12's on-device checks and timings, for the kernels that so far ran only in interpret mode and lowered
# for CUDA on a CPU: the radix-select top-k (float32 histograms since its first, failed, GPU run), the Triton
# scoring kernel over page-blocked keys, and the Mosaic GPU scoring and sparse-attention kernels.
#   run (repo root, device machine):  bash benchmarks/gpu_issue12.sh        -> $OUT/*.json, $OUT/*.log
# Each part has its own timeout; pick parts whose timeouts sum to under a device call's 10 minutes, e.g.
# PARTS="1 3" bash ..., then PARTS="2", then PARTS="4 5" (default: all five, most important first). Checks and
# timings run in separate processes: a kernel that faults on the GPU poisons its process's CUDA context, and every
# later row fails (2026-12-05, `results/kernels-h200-checks-mosaic-fault.json`). Each timing row builds up to 32
# input sets and compiles one function over all of them (~9 s per scoring row, ~25 s per attention row on the H200).
# Afterwards: commit the JSON under benchmarks/results/; where a kernel's checks pass and it beats XLA, let
# `auto` pick it (pallas_kernels/dispatch.py, tests/pallas_kernels/test_kernel_dispatch.py, README).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}
PARTS=${PARTS:-1 2 3 4 5}
mkdir -p "$OUT"
nvidia-smi -L
BENCH="python3 benchmarks/bench_kernels.py"   # a command, not a function: `timeout` runs commands
for part in $PARTS; do case $part in
1)  # the compiled kernels against their references (GPU-marked tests; the model's decode with the top-k kernel)
    timeout 200 python3 -m pytest -q -m gpu tests/pallas_kernels/test_topk.py tests/pallas_kernels/test_indexer_score.py \
      tests/pallas_kernels/test_indexer_score_mgpu.py tests/pallas_kernels/test_sparse_attention_mgpu.py \
      tests/fm_jax/test_model.py > "$OUT/gpu_tests.log" 2>&1
    tail -5 "$OUT/gpu_tests.log" ;;
2)  # on-device checks of every kernel, then scoring over V4's 64-entry key pages: Mosaic vs Triton vs XLA at
    # batch 1 / 8, N 64K / 256K, bf16 and float32 q, and XLA's size-matched row sum (`stream`)
    timeout 150 $BENCH --sections check --out "$OUT/kernels-checks.json" > "$OUT/checks.log" 2>&1
    grep -E "^check" "$OUT/checks.log" | tail -30
    timeout 330 $BENCH --sections ceilings,indexer_mgpu,stream --out "$OUT/kernels-scoring-pages.json" > "$OUT/scoring.log" 2>&1
    tail -30 "$OUT/scoring.log" ;;
3)  # top-k: awkward-row checks and the three target shapes against lax.top_k
    timeout 150 $BENCH --sections topk --quick --out "$OUT/kernels-topk.json" > "$OUT/topk.log" 2>&1
    tail -12 "$OUT/topk.log" ;;
4)  # one decode step's GPU time, lax.top_k against the top-k kernel
    timeout 200 $BENCH --sections step --step-cases 1:131072,8:131072 --out "$OUT/kernels-step.json" > "$OUT/step.log" 2>&1
    tail -6 "$OUT/step.log" ;;
5)  # sparse attention, bf16 kv at batch 1 / 8 / 32 / 64: Mosaic GPU vs Triton vs XLA (targets: batch 8 >= 2x XLA,
    # batch 64 >= 0.5 of the roofline)
    timeout 300 $BENCH --sections ceilings,attention --kv-dtypes bf16 --out "$OUT/kernels-attention-mgpu.json" \
      > "$OUT/attention_mgpu.log" 2>&1
    tail -12 "$OUT/attention_mgpu.log" ;;
*)  echo "unknown part $part (1-5)"; exit 2 ;;
esac; done
