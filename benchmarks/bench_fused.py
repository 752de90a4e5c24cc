"""fused_pmi_kl on the headline workload, with its goals as ratios.

bf16, N=8192, H=4096, V=151,936, three streams, PMI target, forward KL, gradients to the
hidden states and the weight. Everything in one run on one device: the four bare GEMMs
(the floor), pmi_kernels on the Triton and the CUDA row kernels, plain torch, Liger when
installed; the cost of return_stats; then pmi_kernels' peak extra memory (beyond inputs and
the gradients it returns) at N = 8k, 32k and 131k on each backend. On Hopper, the CUDA row kernel
also with each row split over a cluster of 8 and of 16 blocks (PMI_KERNELS_CUDA_CLUSTER).

    python benchmarks/bench_fused.py --out benchmarks/results          # needs a GPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import implementations as impls  # noqa: E402
from common import cuda_cluster, device_info, is_oom, median_ms, peak_extra_gib, slug, write_json  # noqa: E402

from pmi_kernels import fused_pmi_kl  # noqa: E402

GOALS = [  # (label, numerator, denominator, comparison, bound)
    ("pmi_kernels triton / bare GEMMs", "pmi_kernels (triton)", impls.FLOOR, "<=", 1.15),
    ("pmi_kernels cuda / bare GEMMs", "pmi_kernels (cuda)", impls.FLOOR, "<=", 1.10),
    ("pmi_kernels cuda, rows over 8 blocks / bare GEMMs", "pmi_kernels (cuda/c8)", impls.FLOOR, "<=", 1.10),
    ("pmi_kernels cuda, rows over 16 blocks / bare GEMMs", "pmi_kernels (cuda/c16)", impls.FLOOR, "<=", 1.10),
    ("plain torch / pmi_kernels triton", "plain torch", "pmi_kernels (triton)", ">=", 1.9),
    ("liger FLJSD / pmi_kernels, opsd", "liger FusedLinearJSD, opsd 2 streams, jsd 0.5",
     "pmi_kernels (auto), opsd 2 streams, jsd 0.5", ">", 1.0),
]
BACKENDS = ("triton", "cuda")


def usable(backend: str) -> bool:
    from pmi_kernels.backends import REGISTRY
    reason = REGISTRY[backend].unusable_on("cuda")
    if reason:
        print(f"backend {backend} unavailable: {reason}")
    return reason is None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="tokens for the timed comparison")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--memory-n", type=int, nargs="*", default=[8192, 32768, 131072],
                        help="token counts at which pmi_kernels' peak extra memory is measured")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    info = device_info("cuda")
    print(info)
    h, w, h_t, h_r = impls.make_inputs(args.n, args.hidden, args.vocab, torch.bfloat16, "cuda")
    results = {"workload": dict(n=args.n, hidden=args.hidden, vocab=args.vocab, dtype="bf16",
                                loss="PMI target, forward KL(q||p), clip 10, centered; grads to h and W"),
               "info": info, "times_ms": {}, "peak_extra_gib": {}}

    # Exactness at scale: the loss against plain torch on the same inputs.
    ours = fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0).item()
    plain = impls.plain_torch_pmi(h, w, h_t, h_r).mean().item()
    results["loss"] = {"pmi_kernels": ours, "plain torch": plain}
    print(f"loss: pmi_kernels {ours:.6f}  plain torch {plain:.6f}  rel diff {abs(ours - plain) / abs(plain):.2e}")

    keep = h.numel() * h.element_size() + w.numel() * w.element_size()
    candidates = {impls.FLOOR: impls.bare_gemms, **impls.GPU_IMPLEMENTATIONS}
    for name, factory in candidates.items():
        try:
            run = factory(h, w, h_t, h_r)
        except ImportError as err:
            results["times_ms"][name] = f"not installed ({err.name})"
            print(f"{name:48s} not installed")
            continue
        try:
            ms = median_ms(lambda: run(True), "cuda")
            mem = peak_extra_gib(lambda: run(True), keep) if name != impls.FLOOR else None
        except ValueError as err:  # a backend that is not built here
            results["times_ms"][name] = f"unavailable ({err})"
            print(f"{name:48s} unavailable: {err}")
            continue
        except Exception as err:  # noqa: BLE001 (an OOM is a result; anything else is raised)
            if not is_oom(err):
                raise
            ms = mem = "OOM"
            torch.cuda.empty_cache()
        results["times_ms"][name], results["peak_extra_gib"][name] = ms, mem
        floor = results["times_ms"][impls.FLOOR]
        shown = "OOM" if ms == "OOM" else f"{ms:8.2f} ms  x{ms / floor:5.2f} floor" + (
            f"   extra {mem:6.2f} GiB" if mem is not None else "")
        print(f"{name:48s} {shown}")

    # On Hopper, the CUDA row kernel with each row split over a cluster (PMI_KERNELS_CUDA_CLUSTER).
    if usable("cuda") and torch.cuda.get_device_capability()[0] >= 9:
        run = impls.pmi_kernels_cuda(h, w, h_t, h_r)
        for blocks in (8, 16):
            with cuda_cluster(blocks):
                ms = median_ms(lambda: run(True), "cuda")
            name = f"pmi_kernels (cuda/c{blocks})"
            results["times_ms"][name] = ms
            print(f"{name:48s} {ms:8.2f} ms  x{ms / results['times_ms'][impls.FLOOR]:5.2f} floor")

    # return_stats: the per-token statistics from the same sweep, beside the plain call.
    results["return_stats"] = {}
    for backend in filter(usable, BACKENDS):
        def call(stats, backend=backend):
            out = fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0, check_finite=False, backend=backend,
                               return_stats=stats)
            return torch.autograd.grad(out[0] if stats else out, (h, w))
        plain_ms, stats_ms = median_ms(lambda: call(False), "cuda"), median_ms(lambda: call(True), "cuda")
        results["return_stats"][backend] = {"plain_ms": plain_ms, "stats_ms": stats_ms,
                                            "cost": stats_ms / plain_ms - 1}
        print(f"return_stats on {backend:6s}: {stats_ms:8.2f} ms vs {plain_ms:8.2f} ms  "
              f"({100 * (stats_ms / plain_ms - 1):+.1f}%, goal within 5%)")

    del h, w, h_t, h_r
    torch.cuda.empty_cache()
    results["memory_scaling"] = {}
    for n in args.memory_n:
        h, w, h_t, h_r = impls.make_inputs(n, args.hidden, args.vocab, torch.bfloat16, "cuda")
        for backend in filter(usable, BACKENDS):
            run = impls.pmi_kernels_with(backend)(h, w, h_t, h_r)
            mem = peak_extra_gib(lambda: run(True), h.numel() * h.element_size() + w.numel() * w.element_size())
            ms = median_ms(lambda: run(True), "cuda", warmup_ms=1, rep_ms=1)
            results["memory_scaling"][f"{backend} N={n}"] = {"ms": ms, "peak_extra_gib": mem}
            print(f"pmi_kernels ({backend}) at N={n:6d}: {ms:8.1f} ms, extra peak {mem:.2f} GiB")
            del run
        del h, w, h_t, h_r
        torch.cuda.empty_cache()

    times, ratios = results["times_ms"], {}
    for label, num, den, op, bound in GOALS:
        if isinstance(times.get(num), float) and isinstance(times.get(den), float):
            ratios[f"{label} (goal {op} {bound})"] = times[num] / times[den]
    results["ratios"] = ratios
    for k, v in ratios.items():
        print(f"{k:48s} {v:6.3f}")
    write_json(os.path.join(args.out, f"fused_{slug(info['device'])}_{info['date']}.json"), results)


if __name__ == "__main__":
    main()
