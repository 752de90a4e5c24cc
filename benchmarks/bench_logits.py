"""pmi_kl over bf16 logits (three streams): the Triton and the CUDA row kernels against the
copy bandwidth.

Measured in one run: a device-to-device copy (the bandwidth ceiling), pmi_kl forward and
forward+backward on each backend, with return_stats, plain torch on the same logits, Liger's
JSD kernel on two streams, the row kernels on the fused path's two-stream shape (t - r from one
GEMM, kappa given: 10 bytes per entry), and a sweep of the Triton kernel's launch configurations.
On Hopper the CUDA kernel also runs with each row split over a cluster of 8 and of 16 blocks
("cuda/c8", "cuda/c16": PMI_KERNELS_CUDA_CLUSTER), whose later passes re-read from L2.

Bytes per vocabulary entry, by design (bf16 = 2 bytes a value):
    forward KL, 3 streams: kappa pass reads t, r (4) + pass 1 reads s, t, r (6)
                           + pass 2 reads s, t, r and writes grad (8)        = 18
    mixed JSD adds pass 3 (reads 6, writes 2) and pass 2 writes nothing      = 24
    backward: nothing, when the incoming gradient is the one the forward assumed
              (loss.backward() on the mean); otherwise a rescale (read 2, write 2) = +4
The minimum for forward+backward is 8 (read three streams once, write the gradient once).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_cluster, device_info, median_ms, slug, write_json  # noqa: E402

from pmi_kernels import pmi_kl  # noqa: E402
from pmi_kernels.backends import REGISTRY  # noqa: E402
from pmi_kernels.backends.triton.row_kernel import rows as triton_rows  # noqa: E402
from pmi_kernels.options import LossOptions  # noqa: E402

BACKENDS = tuple(b for b in ("triton", "cuda") if REGISTRY[b].unusable_on("cuda") is None)
# The CUDA kernel with each row split over a cluster of blocks (PMI_KERNELS_CUDA_CLUSTER, Hopper).
CLUSTERS = (8, 16)


def variants():
    """(label, backend, cluster size): each backend, and on Hopper the CUDA kernel split."""
    out = [(backend, backend, None) for backend in BACKENDS]
    if "cuda" in BACKENDS and torch.cuda.get_device_capability()[0] >= 9:
        out += [(f"cuda/c{blocks}", "cuda", blocks) for blocks in CLUSTERS]
    return out


# The backward adds nothing when the incoming gradient is the one the forward assumed (here).
BYTES_PER_ENTRY = {"forward KL": {"fwd": 18, "fwd+bwd": 18}, "mixed JSD 0.5": {"fwd": 24, "fwd+bwd": 24}}
SWEEP = [(2048, 4), (2048, 8), (4096, 8)]


def plain_torch_pmi_logits(s, t, r, clip=10.0):
    s = s.float()
    with torch.no_grad():
        delta = t.float().log_softmax(-1) - r.float().log_softmax(-1)
        delta = clip * torch.tanh((delta - delta.mean(-1, keepdim=True)) / clip)
        log_q = (s + delta).log_softmax(-1)
    log_p = s.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--sweep-rows", type=int, default=2048, help="rows for the launch-config sweep")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    info = device_info("cuda")
    print(info)
    print(f"backends: {BACKENDS}")
    n, vocab = args.n, args.vocab
    entries = n * vocab
    gen = torch.Generator(device="cuda").manual_seed(0)
    s, t, r = (torch.randn(n, vocab, generator=gen, device="cuda", dtype=torch.bfloat16) * 3 for _ in range(3))
    results = {"workload": dict(n=n, vocab=vocab, dtype="bf16", streams=3), "info": info, "rows": {}}

    dst = torch.empty_like(s)
    copy_ms = median_ms(lambda: dst.copy_(s), "cuda")
    copy_bw = 2 * s.numel() * s.element_size() / copy_ms / 1e6  # GB/s
    del dst
    results["copy_tb_s"] = copy_bw / 1e3
    print(f"copy bandwidth {copy_bw / 1e3:.2f} TB/s (read + write)")

    student = s.clone().requires_grad_(True)
    rows = results["rows"]
    for name, backend, blocks in variants():
        for label, lam in (("forward KL", 0.0), ("mixed JSD 0.5", 0.5)):
            loss_fn = lambda stats=False: pmi_kl(student, t, r, jsd_beta=lam, check_finite=False,  # noqa: E731
                                                 backend=backend, return_stats=stats)
            phases = (("fwd", lambda: loss_fn()), ("fwd+bwd", lambda: torch.autograd.grad(loss_fn(), student)),
                      ("fwd+bwd, return_stats", lambda: torch.autograd.grad(loss_fn(True)[0], student)))
            for phase, fn in phases:
                with cuda_cluster(blocks):
                    ms = median_ms(fn, "cuda")
                moved = BYTES_PER_ENTRY[label][phase.split(",")[0]] * entries
                frac = moved / ms / 1e6 / copy_bw
                rows[f"{name} {label} {phase}"] = {"ms": ms, "bytes": moved, "fraction_of_copy_bw": frac}
                print(f"{name:8s} {label:14s} {phase:22s} {ms:8.2f} ms  {moved / ms / 1e6:7.0f} GB/s"
                      f"  = {100 * frac:5.1f}% of copy")
    ms = median_ms(lambda: torch.autograd.grad(plain_torch_pmi_logits(student, t, r), student), "cuda")
    rows["plain torch forward KL fwd+bwd"] = {"ms": ms}
    print(f"plain torch forward KL fwd+bwd {ms:8.2f} ms  (x{ms / rows['triton forward KL fwd+bwd']['ms']:.2f} the "
          f"Triton kernel)")
    try:
        from liger_kernel.transformers import LigerJSD
        log_p = student.detach().float().log_softmax(-1).to(torch.bfloat16).requires_grad_(True)
        log_q = t.float().log_softmax(-1).to(torch.bfloat16)
        jsd = LigerJSD(beta=0.5)
        ms = median_ms(lambda: torch.autograd.grad(jsd(log_p, log_q), log_p), "cuda")
        rows["liger JSD 2 streams (log-probs given) fwd+bwd"] = {"ms": ms}
        print(f"liger JSD, 2 streams, fwd+bwd {ms:8.2f} ms")
        del log_p, log_q
    except ImportError:
        rows["liger JSD"] = "liger-kernel not installed"

    # The fused path's shape: s and t - r, kappa given, forward KL, the gradient over s.
    del student, r
    torch.cuda.empty_cache()
    m = args.sweep_rows
    s2, d2, grad = s[:m], t[:m], torch.empty_like(s[:m])
    kappa = torch.zeros(m, device="cuda")
    opts = LossOptions(pmi=True, jsd_beta=0.0)
    fused_shape = {}
    for name, backend, blocks in variants():
        with cuda_cluster(blocks):
            ms = median_ms(lambda: REGISTRY[backend].rows(s2, d2, opts=opts, kappa=kappa, grad_out=grad), "cuda")
        bw = 10 * m * vocab / ms / 1e6
        fused_shape[name] = {"ms": ms, "gb_s": bw, "fraction_of_copy_bw": bw / copy_bw}
        print(f"{name:8s} row kernel, fused shape: {ms:6.3f} ms  {bw:6.0f} GB/s = {100 * bw / copy_bw:5.1f}% of copy"
              f" (10 B/entry)")
    results["fused_shape"] = fused_shape
    sweep = {}
    for block, warps in SWEEP:
        ms = median_ms(lambda: triton_rows(s2, d2, opts=opts, kappa=kappa, grad_out=grad, block=block,
                                           num_warps=warps), "cuda")
        bw = 10 * m * vocab / ms / 1e6
        sweep[f"{block}x{warps}"] = {"ms": ms, "gb_s": bw}
        print(f"triton row kernel, fused shape, BLOCK_V={block:5d} warps={warps:2d}: {ms:6.3f} ms  {bw:6.0f} GB/s"
              f" = {100 * bw / copy_bw:5.1f}% of copy")
    results["fused_shape_sweep"] = sweep
    write_json(os.path.join(args.out, f"logits_{slug(info['device'])}_{info['date']}.json"), results)


if __name__ == "__main__":
    main()
