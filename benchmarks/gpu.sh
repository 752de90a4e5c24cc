#!/usr/bin/env bash
# One prepared run for a lent GPU: build the C++/CUDA kernels, run the tests on the CUDA paths,
# the headline benchmarks of both GPU backends, then the sweep (each `python -m benchmarks <name>`):
# the records (results.jsonl), the sweep's table (sweep.md) and plots, and each stage's log to
# $OUT (the logs are for reading the run; git ignores them). Wheels carried in .wheels/
# (liger-kernel is not on the GPU machine) are installed first. Each stage has its own time
# limit, so one slow stage cannot take the others' results with it; by default the whole run
# ends inside about 6 minutes on an H100/H200.
#   OUT      where everything lands (default benchmarks/results/<gpu>-<date>, e.g. h200-2026-11-28)
#   STAGES   which stages run (default "build tests logits fused parallel sweep"; also "train": the
#            packing tests on CUDA and `train_step --gpu`, about 4 minutes more; "verl": two
#            steps of the verl integration's launcher; needs verl 0.9 and vLLM importable there;
#            "wheel": setup.py's CUDA build, a wheel installed into a fresh venv and run from there)
#   SWEEP_MINUTES   the sweep's time budget (default 2); SWEEP_MATCH: only implementations whose
#                   name contains one of these words (`sweep --match`)
set -uo pipefail
# Everything is written to $RES; the device tool brings back at most 8 files from $OUT, so each
# stage ends by packing $RES into $OUT/results.tar.gz (and copying the short logs beside it).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr '[:upper:]' '[:lower:]' \
    | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/-$//')
OUT=${OUT:-benchmarks/results/${gpu:-gpu}-$(date +%F)}
RES=${RES:-$(mktemp -d)}
STAGES=${STAGES:-build tests logits fused parallel sweep}
mkdir -p "$OUT" "$RES"
pack() { tar -czf "$OUT/results.tar.gz" -C "$RES" . && cp "$RES"/*.log "$OUT"/ 2>/dev/null; true; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD PMI_KERNELS_CACHE=${PMI_KERNELS_CACHE:-/tmp/pmi_kernels_cache}
ls .wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps .wheels/*.whl
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$RES/nvidia-smi.txt"
if has build; then
    # The extension for this machine's torch, for the GPU it has (saves a second architecture).
    arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}' + ('a' if m == 9 else ''))")
    PMI_KERNELS_CUDA_ARCHS=$arch timeout 300 python3 -m pmi_kernels.backends.native.build 2>&1 | tee "$RES/build.log"
    export PMI_KERNELS_CUDA_ARCHS=$arch
fi
if has tests; then
    # The CUDA paths of every kernel test; the CPU-only tests ran in CI.
    timeout 240 python3 -m pytest tests/test_backends.py tests/test_pmi_kl.py tests/test_fused.py \
        tests/test_diagnostics.py tests/test_chunks.py tests/test_conventions.py tests/test_precision.py \
        tests/test_hand_expansion.py -k "cuda" -q -p no:cacheprovider 2>&1 | tee "$RES/tests.log" | tail -8; pack
    # On Hopper, the CUDA kernel's rows split over clusters of 16 blocks, under the same tests.
    if python3 -c "import sys, torch; sys.exit(torch.cuda.get_device_capability()[0] < 9)"; then
        PMI_KERNELS_CUDA_CLUSTER=16 timeout 180 python3 -m pytest tests/test_backends.py tests/test_pmi_kl.py \
            tests/test_fused.py -k "cuda-cuda or test_cuda" -q -p no:cacheprovider 2>&1 \
            | tee "$RES/tests_cluster16.log" | tail -8; pack
    fi
fi
has logits && { timeout 150 python3 -m benchmarks logits --out "$RES" 2>&1 | grep -v "Backend impl" \
    | tee "$RES/logits.log"; pack; }
has fused && { timeout 240 python3 -m benchmarks fused --out "$RES" 2>&1 | grep -v "Backend impl" \
    | tee "$RES/fused.log"; pack; }
has parallel && { timeout 120 python3 -m benchmarks vocab_parallel --out "$RES" 2>&1 \
    | tee "$RES/vocab_parallel.log"; pack; }
if has train; then
    # Packed training steps: the packing tests on CUDA (varlen_attn, flash-attn if installed),
    # then one optimizer step of a Qwen3-1.7B-shaped model (32 rollouts x 1,024 tokens, LoRA r64,
    # gradient checkpointing): packed varlen (whole, and in packs of <= 2,048, 4,096 and 8,192
    # tokens: the memory the budget buys back) against padded sdpa and the per-rollout loop.
    timeout 120 python3 -m pytest tests/test_train_packed.py -k cuda -q -p no:cacheprovider 2>&1 \
        | tee "$RES/train_tests.log" | tail -4
    timeout 420 python3 -m benchmarks train_step --gpu --repeats 3 --budget 2048 4096 8192 --out "$RES" 2>&1 \
        | grep -v -i warn \
        | tee "$RES/train_step.log"; pack
fi
if has wheel; then
    # setup.py's CUDAExtension branch, which a CPU torch never takes: a wheel built for this GPU,
    # installed into a fresh venv (this machine's torch through --system-site-packages), whose
    # backend "cuda" must run the wheel's own library at once (no build) and match the reference.
    arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
    python3 -m venv --system-site-packages "$RES/wheel-venv"
    TORCH_CUDA_ARCH_LIST=$arch PMI_KERNELS_BUILD_NATIVE=1 timeout 420 python3 -m pip wheel -q --no-build-isolation \
        --no-deps . -w "$RES/wheel" > "$RES/wheel.log" 2>&1 && "$RES/wheel-venv/bin/pip" install -q --no-deps \
        "$RES"/wheel/pmi_kernels-*.whl >> "$RES/wheel.log" 2>&1
    (cd "$RES" && PYTHONPATH= PMI_KERNELS_CACHE="$RES/unused-cache" "$RES/wheel-venv/bin/python" -c "
import torch, pmi_kernels
from pmi_kernels.backends.native import extension
from pmi_kernels.reference import pmi_kl_reference
s, t, r = (torch.randn(64, 1000, device='cuda') for _ in range(3))
got = pmi_kernels.pmi_kl(s, t, r, backend='cuda')
print('wheel: loaded', extension.loaded_from(), '| loss', got.item(), 'reference', pmi_kl_reference(s, t, r).item())
assert 'site-packages' in str(extension.loaded_from()), 'not the wheel library'
torch.testing.assert_close(got, pmi_kl_reference(s, t, r))
print('wheel: OK')") 2>&1 | tee -a "$RES/wheel.log" | tail -3; pack
fi
if has verl; then
    # The verl integration end to end (docs/verl.md), what the CPU tests cannot run: Ray, the
    # PMI worker's dispatch and init_model, vLLM rollouts, remove-padding (flash-attention varlen)
    # and bf16 autocast. Two steps on one GPU with a tiny Qwen3 built in code (LoRA, the anchor,
    # diagnostics every step); the log must show a finite actor/pmi/loss. verl's own wheel fits
    # in .wheels/, vLLM's does not (the device tool carries 64 MiB): vLLM must be on the machine.
    if ! python3 -c "import verl, vllm" > "$RES/verl.log" 2>&1; then
        echo "verl: skipped, verl or vLLM does not import (see verl.log)"
    else
        python3 examples/verl/prepare_toy.py --out "$RES/verl_toy" >> "$RES/verl.log" 2>&1
        timeout 540 python3 -m pmi_kernels.integrations.verl.main --config-path "$PWD/examples/verl" \
            --config-name pmi_qwen3 actor_rollout_ref.model.path="$RES/verl_toy/model" \
            data.train_files="$RES/verl_toy/train.parquet" data.val_files="$RES/verl_toy/test.parquet" \
            data.train_batch_size=8 data.max_prompt_length=256 data.max_response_length=64 \
            actor_rollout_ref.model.lora_rank=8 actor_rollout_ref.model.lora_alpha=16 \
            actor_rollout_ref.actor.ppo_mini_batch_size=8 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
            actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
            actor_rollout_ref.rollout.gpu_memory_utilization=0.3 actor_rollout_ref.pmi.anchor=true \
            actor_rollout_ref.pmi.diagnostics_every=1 trainer.n_gpus_per_node=1 trainer.total_training_steps=2 \
            trainer.logger=[console] trainer.val_before_train=false trainer.test_freq=-1 trainer.save_freq=-1 \
            >> "$RES/verl.log" 2>&1
        grep -o "actor/pmi/[a-z_/]*:[^ ]*" "$RES/verl.log" | tail -20
        grep -Eq "actor/pmi/loss:-?[0-9]" "$RES/verl.log" && echo "verl: actor/pmi/loss logged" || echo "verl: FAILED"
    fi
    pack
fi
if has sweep; then
    # The sweep starts a case only if it should end within the budget; the hard limit is a minute more.
    minutes=${SWEEP_MINUTES:-2}
    timeout "$(python3 -c "print(int(60 * $minutes) + 60)")" python3 -m benchmarks sweep --out "$RES" \
        --max-minutes "$minutes" ${SWEEP_MATCH:+--match $SWEEP_MATCH} 2>&1 | grep -v "Backend impl" > "$RES/sweep.log"
    tail -n 30 "$RES/sweep.log"; pack
fi
