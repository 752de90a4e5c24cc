"""What a vocabulary-parallel call communicates: the payload of its all-reduces, per call.

The figures come from the shapes (the formula below), and the same script checks the formula
against a traced count: it runs the calls on 2 CPU processes (gloo) and counts every byte handed
to an all-reduce. Payload bytes, not wire bytes (a ring all-reduce sends about 2 (k-1)/k of the
payload per rank).

    python -m benchmarks comm_bytes                  # headline shapes + the traced check

Per call, with N rows, compute dtype of 4 bytes (fp32; 8 for fp64):
    every rank's checks settled together (Agreement)    3 x 8 bytes
    the whole vocabulary and the widest shard          2 x 8 bytes
    kappa (clip on): centering sum  N x 4 (fused_pmi_kl: W_f's column sum, H x 4),
                     or lse(t) - lse(r) (centering off): 4 N x 4
    phase 1, the log-sum-exps of s and g                4 N x 4
    phase 2, loss and slope sums (+3 statistics)        2 N x 4   (5 N x 4)
fused_pmi_kl adds the hidden-state gradient (N x H x the input dtype's size): O(N H), never
O(N V).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmi_kernels.options import LossOptions

from . import harness


def payload_bytes(n: int, opts: LossOptions, *, stats=False, fused_hidden=None, grad_h_itemsize=2, acc=4) -> int:
    """The formula of the docstring. fused_hidden: H for fused_pmi_kl (None for pmi_kl)."""
    total = 3 * 8 + 2 * 8
    if opts.separate_lse:
        total += 4 * n * acc
    elif opts.needs_kappa:  # the centering sum: per row, or W_f's column sum in the fused form
        total += (n if fused_hidden is None else fused_hidden) * acc
    total += 4 * n * acc + (5 if stats else 2) * n * acc
    if fused_hidden is not None:
        total += n * fused_hidden * grad_h_itemsize
    return total


CASES = [
    ("pmi_kl", dict(), False),
    ("pmi_kl", dict(clip=3.0, center=False), True),
    ("fused_pmi_kl", dict(), False),
    ("fused_pmi_kl", dict(jsd_beta=0.0, clip=None), True),
]


def _traced(rank, world, init_file, n, hidden, vocab, result_file):
    from pmi_kernels import fused_pmi_kl, pmi_kl, vocab_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    counted = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counted.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        group = dist.new_group(list(range(world)))
        local_v = vocab // world + (rank < vocab % world)
        lines = []
        for fn_name, options, stats in CASES:
            gen = torch.Generator().manual_seed(0)
            counted.clear()
            if fn_name == "pmi_kl":
                s, t, r = (torch.randn(n, local_v, generator=gen) for _ in range(3))
                s.requires_grad_(True)
                out = pmi_kl(s, t, r, process_group=group, return_stats=stats, **options)
                (out[0] if stats else out).backward()
            else:
                h, h_t, h_r = (torch.randn(n, hidden, generator=gen, dtype=torch.bfloat16) for _ in range(3))
                w = torch.randn(local_v, hidden, generator=gen, dtype=torch.bfloat16).requires_grad_(True)
                h.requires_grad_(True)
                out = fused_pmi_kl(h, w, h_t, h_r, process_group=group, return_stats=stats, **options)
                (out[0] if stats else out).backward()
            opts = LossOptions(pmi=True, **options)
            want = payload_bytes(n, opts, stats=stats, fused_hidden=None if fn_name == "pmi_kl" else hidden)
            lines.append(f"{fn_name} {options} stats={stats}: traced {sum(counted)} B, formula {want} B")
            assert sum(counted) == want, lines[-1]
        if rank == 0:
            with open(result_file, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        assert vocab_parallel  # the module the counted all-reduces go through
    finally:
        dist.all_reduce = original
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


def traced_check(n=7, hidden=16, vocab=101, world=2) -> str:
    """Runs the cases on `world` gloo processes and checks every traced count against the formula."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.txt")
        mp.spawn(
            _traced, args=(world, os.path.join(tmp, "rendezvous"), n, hidden, vocab, result), nprocs=world, join=True
        )
        with open(result) as fh:
            return fh.read()


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("comm_bytes", __doc__, devices=("cpu",), n=8192, hidden=4096)
    args = harness.resolve(parser.parse_args(argv))
    results = harness.Results("comm_bytes", args.out, "cpu")
    print(
        f"All-reduce payload per call, N = {args.n:,} rows, H = {args.hidden:,}, bf16 hidden states, fp32 statistics:"
    )
    for fn_name, options, stats in CASES:
        opts = LossOptions(pmi=True, **options)
        b = payload_bytes(args.n, opts, stats=stats, fused_hidden=None if fn_name == "pmi_kl" else args.hidden)
        results.add(
            f"{fn_name} {options} stats={stats}",
            "formula",
            "all_reduce_payload",
            b,
            "bytes",
            n=args.n,
            hidden=args.hidden if fn_name == "fused_pmi_kl" else None,
            **options,
            return_stats=stats,
        )
        print(f"  {fn_name:13s} {str(options):38s} stats={stats!s:5s} {b / 2**20:8.2f} MiB")
    print(f"(a [N, V] fp32 tensor at V = 151,936 would be {args.n * 151936 * 4 / 2**20:,.0f} MiB)")
    print("traced on 2 gloo processes, N = 7, H = 16, V = 101:")
    report = traced_check()
    sys.stdout.write(report)
    results.add(
        "traced on 2 gloo processes, N=7 H=16 V=101",
        "traced",
        "cases_matching_formula",
        report.count("traced"),
        "cases",
        world=2,
        n=7,
        hidden=16,
        vocab=101,
    )
    results.close()


if __name__ == "__main__":
    main()
