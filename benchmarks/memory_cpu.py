"""Peak memory of the chunked CPU path against the materializing reference, measured in one run.

Each measurement runs in a fresh process: build the inputs, note the peak resident memory,
run forward + backward, and report how far the peak rose, less the gradients returned
(grad_h and grad_W). The chunked path must stay under a quarter of the reference, and its
extra memory must not grow with N.

    python -m benchmarks memory_cpu            # fp32, H=256, V=32000, N = 1024, 4096, 16384
    python -m benchmarks memory_cpu --n 256 --vocab 8000     # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
from collections.abc import Sequence

import torch

from . import harness

IMPLEMENTATIONS = ("chunked", "reference")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure_one(impl: str, n: int, hidden: int, vocab: int) -> dict:
    from pmi_kernels import fused_pmi_kl
    from pmi_kernels.reference import fused_pmi_kl_reference

    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * hidden**-0.5 * 3).requires_grad_(True)
    h_t, h_r = torch.randn(n, hidden), torch.randn(n, hidden)
    fn = fused_pmi_kl if impl == "chunked" else fused_pmi_kl_reference
    # Warm the allocator and the lazy imports on a tiny problem, outside the measurement.
    torch.autograd.grad(fn(h[:2], w[:64], h_t[:2], h_r[:2]), (h,), allow_unused=True)
    before = peak_rss_bytes()
    grads = torch.autograd.grad(fn(h, w, h_t, h_r), (h, w))
    returned = sum(g.numel() * g.element_size() for g in grads)
    return {"impl": impl, "n": n, "extra_gib": (peak_rss_bytes() - before - returned) / 2**30}


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("memory_cpu", __doc__, devices=("cpu",), n=[1024, 4096, 16384], hidden=256, vocab=32000)
    parser.add_argument("--reference-max-n", type=int, default=4096, help="largest N for the reference")
    parser.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = harness.resolve(parser.parse_args(argv))
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.hidden, args.vocab)))
        return
    results = harness.Results("memory_cpu", args.out, "cpu")
    params = dict(hidden=args.hidden, vocab=args.vocab, dtype="fp32")
    rows = []
    for n in args.n:
        for impl in IMPLEMENTATIONS:
            if impl == "reference" and n > args.reference_max_n:
                continue
            cmd = harness.fresh_process(
                "memory_cpu", ["--one", impl, str(n), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
            )
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=harness.fresh_process_env())
            row = json.loads(done.stdout.splitlines()[-1])
            rows.append(row)
            results.add(
                f"fused_pmi_kl fwd+bwd N={n} H={args.hidden} V={args.vocab}",
                impl,
                "peak_extra_memory",
                row["extra_gib"],
                "GiB",
                n=n,
                **params,
            )
            print(f"{impl:10s} N={n:6d}  extra peak {row['extra_gib']:6.3f} GiB")
    print(results.device)
    for n in (n for n in args.n if n <= args.reference_max_n):
        chunked = next(r["extra_gib"] for r in rows if r["n"] == n and r["impl"] == "chunked")
        reference = next(r["extra_gib"] for r in rows if r["n"] == n and r["impl"] == "reference")
        results.add_ratio(
            f"fused_pmi_kl fwd+bwd N={n} H={args.hidden} V={args.vocab}",
            "chunked",
            "reference",
            chunked / reference,
            n=n,
            **params,
            goal="< 0.25",
        )
        print(f"chunked / reference at N={n}: {chunked / reference:.3f}  (goal < 0.25)")
    results.close()


if __name__ == "__main__":
    main()
