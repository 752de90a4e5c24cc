#!/usr/bin/env bash
# One prepared run for a lent GPU: the tests (CUDA paths included), then the sweep; logs, JSON,
# CSV, markdown and plots to $OUT. Wheels carried in .wheels/ (liger-kernel is not on the GPU
# machine) are installed first. Each stage has its own time limit, so one slow stage cannot take
# the others' results with it. By default it ends inside 8 minutes on an H100/H200 (tests about
# 1.5, sweep at most SWEEP_MINUTES=5.5); HEADLINE=1 adds the three headline scripts (~5 more).
set -uo pipefail
# Everything is written to $RES; the device tool brings back at most 8 files from $OUT, so each
# stage ends by packing $RES into $OUT/results.tar.gz (and copying the short logs beside it).
OUT=${OUT:-benchmarks/results/latest}
RES=${RES:-$(mktemp -d)}
mkdir -p "$OUT" "$RES"
pack() { tar -czf "$OUT/results.tar.gz" -C "$RES" . && cp "$RES"/*.log "$OUT"/ 2>/dev/null; true; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ls .wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .wheels/*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$RES/nvidia-smi.txt"
timeout 180 python3 -m pytest tests -p no:cacheprovider 2>&1 | tee "$RES/tests.log" | tail -4; pack
if [ "${HEADLINE:-0}" = 1 ]; then
    timeout 150 python3 benchmarks/bench_logits.py --out "$RES" 2>&1 | tee "$RES/bench_logits.log"
    timeout 240 python3 benchmarks/bench_fused.py --out "$RES" 2>&1 | tee "$RES/bench_fused.log"; pack
    timeout 120 python3 benchmarks/bench_train_step.py --out "$RES" 2>&1 | grep -v -i warn | tee "$RES/train_step.log"
    pack
fi
# The sweep starts a case only if it should end within the budget; the hard limit is a minute more.
minutes=${SWEEP_MINUTES:-5.5}
timeout "$(python3 -c "print(int(60 * $minutes) + 60)")" python3 benchmarks/run.py --out "$RES" --max-minutes "$minutes" \
    2>&1 | grep -v "Backend impl" > "$RES/sweep.log"; tail -n 40 "$RES/sweep.log"; pack
