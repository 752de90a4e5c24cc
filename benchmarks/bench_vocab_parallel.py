"""What the vocabulary-parallel machinery costs: fused_pmi_kl with a process group of size 1 (the
phases, the all-reduces, the chunk plan over the widest shard) against the plain call, measured
interleaved in one run on one device. Goal on a GPU: at most 1.02x.

    python benchmarks/bench_vocab_parallel.py --out DIR      # a GPU: the headline shape (NCCL)
                                                             # a CPU: a small shape (gloo)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import implementations as impls  # noqa: E402
from common import device_info, slug, time_ms, write_json  # noqa: E402

from pmi_kernels import fused_pmi_kl  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/latest")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, hidden, vocab, dtype = ((8192, 4096, 151936, torch.bfloat16) if device == "cuda"
                               else (512, 256, 32000, torch.float32))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp}/rendezvous",
                                rank=0, world_size=1)
        try:
            group = dist.new_group([0])
            h, w, h_t, h_r = impls.make_inputs(n, hidden, vocab, dtype, device)

            def call(process_group):
                loss = fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0, check_finite=False, process_group=process_group)
                return torch.autograd.grad(loss, (h, w))
            sides = {"plain": lambda: call(None), "process group of 1": lambda: call(group)}
            for fn in sides.values():
                fn()
            times = {name: [] for name in sides}
            for _ in range(args.repeats):
                for name, fn in sides.items():
                    times[name].append(time_ms(fn, device))
        finally:
            dist.destroy_process_group()
    info = device_info(device)
    ms = {name: statistics.median(t) for name, t in times.items()}
    ratio = ms["process group of 1"] / ms["plain"]
    print(info)
    print(f"fused_pmi_kl fwd+bwd N={n} H={hidden} V={vocab} {str(dtype)[6:]}: plain {ms['plain']:.2f} ms, "
          f"process group of 1 {ms['process group of 1']:.2f} ms, ratio {ratio:.3f} (goal on a GPU: <= 1.02)")
    write_json(os.path.join(args.out, f"vocab_parallel_{slug(info['device'])}_{info['date']}.json"),
               {"info": info, "workload": dict(n=n, hidden=hidden, vocab=vocab, dtype=str(dtype)), "ms": ms,
                "ratio": ratio})


if __name__ == "__main__":
    main()
