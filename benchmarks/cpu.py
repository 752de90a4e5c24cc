"""The C++ CPU kernel (backend "cpu") against the chunked plain-torch path (backend "torch"),
and the cost of return_stats, on this machine's CPU. The two sides of each ratio are timed
interleaved in one run (A, B, C, then C, B, A, ...), so a busy machine slows them alike.

    pmi_kl        forward + backward, fp32 [N = 512, V] logits, three streams
    fused_pmi_kl  forward + backward, fp32, N = 2048, H = 256, V = 32,000, three streams

    python -m benchmarks cpu --out benchmarks/results/cpu-$(date +%F)
    python -m benchmarks cpu --threads 1 --repeats 1 --vocab 8000 --n 64 --fused-n 128   # quick
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pmi_kernels import fused_pmi_kl, pmi_kl

from . import harness


def logits_case(n: int, vocab: int, backend: str, stats: bool = False) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    s, t, r = (torch.randn(n, vocab, generator=gen) * 3 for _ in range(3))
    s.requires_grad_(True)

    def run() -> None:
        out = pmi_kl(s, t, r, backend=backend, check_finite=False, return_stats=stats)
        loss = out[0] if stats else out
        torch.autograd.grad(loss, s)

    return run


def fused_case(n: int, hidden: int, vocab: int, backend: str, stats: bool = False) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    h, h_t, h_r = (torch.randn(n, hidden, generator=gen) for _ in range(3))
    w = (torch.randn(vocab, hidden, generator=gen) * 3 / hidden**0.5).requires_grad_(True)
    h.requires_grad_(True)

    def run() -> None:
        out = fused_pmi_kl(h, w, h_t, h_r, backend=backend, check_finite=False, return_stats=stats)
        loss = out[0] if stats else out
        torch.autograd.grad(loss, (h, w))

    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("cpu", __doc__, devices=("cpu",), repeats=5, n=512, hidden=256, vocab=32000)
    parser.add_argument("--large-vocab", type=int, default=151936, help="pmi_kl's second vocabulary")
    parser.add_argument("--fused-n", type=int, default=2048, help="fused_pmi_kl's rows")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's and the kernel's threads (default: torch's, every core); 1 shows the "
        "per-core ratio, which a machine shared with other jobs disturbs less",
    )
    args = harness.resolve(parser.parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    results = harness.Results("cpu", args.out, "cpu")
    print(results.device)
    cases: dict[str, tuple[Callable, dict]] = {
        f"pmi_kl fwd+bwd N={args.n} V={args.vocab}": (logits_case, dict(n=args.n, vocab=args.vocab)),
        f"pmi_kl fwd+bwd N={args.n} V={args.large_vocab}": (logits_case, dict(n=args.n, vocab=args.large_vocab)),
        f"fused_pmi_kl fwd+bwd N={args.fused_n} H={args.hidden} V={args.vocab}": (
            fused_case,
            dict(n=args.fused_n, hidden=args.hidden, vocab=args.vocab),
        ),
    }
    for label, (make, shape) in cases.items():
        timings = harness.interleaved(
            {
                "cpu": make(backend="cpu", **shape),
                "torch": make(backend="torch", **shape),
                "cpu + return_stats": make(backend="cpu", stats=True, **shape),
            },
            "cpu",
            args.repeats,
        )
        ms = {name: timing.ms for name, timing in timings.items()}
        params = dict(shape, dtype="fp32", threads=torch.get_num_threads())
        for timing in timings.values():
            results.add_time(label, timing, **params)
        ratio, cost = ms["torch"] / ms["cpu"], ms["cpu + return_stats"] / ms["cpu"] - 1
        results.add_ratio(label, "torch", "cpu", ratio, **params)
        results.add_ratio(label, "cpu + return_stats", "cpu", 1 + cost, **params)
        print(
            f"{label:44s} cpu {ms['cpu']:8.1f} ms  torch {ms['torch']:8.1f} ms  x{ratio:5.2f}"
            f"   return_stats {100 * cost:+5.1f}%"
        )
    results.close()


if __name__ == "__main__":
    main()
