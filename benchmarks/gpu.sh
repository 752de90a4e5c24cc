#!/usr/bin/env bash
# One prepared run for a lent GPU: CUDA tests, then the headline benchmarks; logs and JSON to $OUT.
# Wheels carried in .wheels/ (liger-kernel is not on the GPU machine) are installed first.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ls .wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .wheels/*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 180 python3 -m pytest tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
timeout 150 python3 benchmarks/bench_logits.py --out "$OUT" 2>&1 | tee "$OUT/bench_logits.log"
timeout 240 python3 benchmarks/bench_fused.py --out "$OUT" 2>&1 | tee "$OUT/bench_fused.log"
