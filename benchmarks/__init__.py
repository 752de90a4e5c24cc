"""The benchmarks of pmi_kernels, one harness (harness.py) and one result schema (harness.Record,
one JSON line each in <out>/results.jsonl). Run one as `python -m benchmarks <name> [options]`
from the repository root; `python -m benchmarks` lists them."""

# name: what it measures (the module benchmarks.<name> has main(argv)).
BENCHMARKS = {
    "sweep": "every implementation over N, V, H, forward and forward+backward (any device)",
    "fused": "fused_pmi_kl on the headline workload against its goals (GPU)",
    "logits": "pmi_kl over bf16 logits against the copy bandwidth (GPU)",
    "cpu": "the C++ CPU kernel against the chunked plain-torch path (CPU)",
    "vocab_parallel": "fused_pmi_kl with a process group of one against the plain call (any device)",
    "train_step": "one optimizer step of the trainer, packed against the per-rollout loop (any device)",
    "memory_cpu": "the chunked CPU path's peak memory against the reference's (CPU)",
    "comm_bytes": "the bytes a vocabulary-parallel call all-reduces, checked against a traced count",
    "kernel_resources": "registers and spills of the Triton kernels compiled for sm_90 (no GPU needed)",
}
