"""The C++ CPU kernel (backend "cpu") against the chunked plain-torch path (backend "torch"),
and the cost of return_stats, on this machine's CPU. The two sides of each ratio are timed
interleaved in one run (A, B, A, B, ...), so a busy machine slows both alike.

    pmi_kl        forward + backward, fp32 [N = 512, V] logits, three streams
    fused_pmi_kl  forward + backward, fp32, N = 2048, H = 256, V = 32,000, three streams

    python benchmarks/bench_cpu.py --out benchmarks/results/cpu-$(date +%F)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, slug, write_json  # noqa: E402

from pmi_kernels import fused_pmi_kl, pmi_kl  # noqa: E402


def interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median wall time of each fn, the fns called in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def logits_case(n, vocab, backend, stats=False):
    gen = torch.Generator().manual_seed(0)
    s, t, r = (torch.randn(n, vocab, generator=gen) * 3 for _ in range(3))
    s.requires_grad_(True)

    def run():
        out = pmi_kl(s, t, r, backend=backend, check_finite=False, return_stats=stats)
        loss = out[0] if stats else out
        torch.autograd.grad(loss, s)
    return run


def fused_case(n, hidden, vocab, backend, stats=False):
    gen = torch.Generator().manual_seed(0)
    h, h_t, h_r = (torch.randn(n, hidden, generator=gen) for _ in range(3))
    w = (torch.randn(vocab, hidden, generator=gen) * 3 / hidden ** 0.5).requires_grad_(True)
    h.requires_grad_(True)

    def run():
        out = fused_pmi_kl(h, w, h_t, h_r, backend=backend, check_finite=False, return_stats=stats)
        loss = out[0] if stats else out
        torch.autograd.grad(loss, (h, w))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's and the kernel's threads (default: torch's, every core); 1 shows the "
                             "per-core ratio, which a machine shared with other jobs disturbs less")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = device_info("cpu")
    info["threads"] = torch.get_num_threads()
    print(info)
    results = {"info": info, "cases": {}}
    cases = {
        "pmi_kl fwd+bwd N=512 V=32000": lambda be, st=False: logits_case(512, 32000, be, st),
        "pmi_kl fwd+bwd N=512 V=151936": lambda be, st=False: logits_case(512, 151936, be, st),
        "fused_pmi_kl fwd+bwd N=2048 H=256 V=32000": lambda be, st=False: fused_case(2048, 256, 32000, be, st),
    }
    for label, make in cases.items():
        ms = interleaved_ms({"cpu": make("cpu"), "torch": make("torch"), "cpu + return_stats": make("cpu", True)},
                            args.repeats)
        row = {"ms": ms, "torch / cpu": ms["torch"] / ms["cpu"],
               "return_stats cost": ms["cpu + return_stats"] / ms["cpu"] - 1}
        results["cases"][label] = row
        print(f"{label:44s} cpu {ms['cpu']:8.1f} ms  torch {ms['torch']:8.1f} ms  x{row['torch / cpu']:5.2f}"
              f"   return_stats {100 * row['return_stats cost']:+5.1f}%")
    info["load_average"] = os.getloadavg()  # what else the machine ran meanwhile
    threads = f"_{info['threads']}-thread" if args.threads else ""
    write_json(os.path.join(args.out, f"cpu_kernel_{slug(info['device'])}{threads}_{info['date']}.json"), results)


if __name__ == "__main__":
    main()
