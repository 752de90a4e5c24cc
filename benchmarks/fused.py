"""fused_pmi_kl on the headline workload, with its goals as ratios.

bf16, N=8192, H=4096, V=151,936, three streams, PMI target, forward KL, gradients to the
hidden states and the weight. Everything in one run on one device, the sides of the timed
comparison interleaved: the four bare GEMMs (the floor), pmi_kernels on the Triton and the CUDA
row kernels (on Hopper the CUDA kernel also with each row split over a cluster of 8 and of 16
blocks: PMI_KERNELS_CUDA_CLUSTER), plain torch, Liger when installed; then each side's peak
extra memory (beyond inputs and the gradients it returns); the cost of return_stats; then
pmi_kernels' peak extra memory at N = 8k, 32k and 131k on each backend.

    python -m benchmarks fused --out DIR                  # needs a GPU
    python -m benchmarks fused --device cpu --n 64 --hidden 32 --vocab 512 --memory-n 64   # a CPU check
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pmi_kernels import fused_pmi_kl
from pmi_kernels.backends import REGISTRY

from . import harness
from . import implementations as impls

GOALS = [  # (label, numerator, denominator, comparison, bound)
    ("pmi_kernels triton / bare GEMMs", "pmi_kernels (triton)", impls.FLOOR, "<=", 1.15),
    ("pmi_kernels cuda / bare GEMMs", "pmi_kernels (cuda)", impls.FLOOR, "<=", 1.10),
    ("pmi_kernels cuda, rows over 8 blocks / bare GEMMs", "pmi_kernels (cuda/c8)", impls.FLOOR, "<=", 1.10),
    ("pmi_kernels cuda, rows over 16 blocks / bare GEMMs", "pmi_kernels (cuda/c16)", impls.FLOOR, "<=", 1.10),
    ("plain torch / pmi_kernels triton", "plain torch", "pmi_kernels (triton)", ">=", 1.9),
    (
        "liger FLJSD / pmi_kernels, opsd",
        "liger FusedLinearJSD, opsd 2 streams, jsd 0.5",
        "pmi_kernels (auto), opsd 2 streams, jsd 0.5",
        ">",
        1.0,
    ),
]
BACKENDS = ("triton", "cuda")
CLUSTERS = (8, 16)


def usable(backend: str, device: str) -> bool:
    reason = REGISTRY[backend].unusable_on(device)
    if reason:
        print(f"backend {backend} unavailable: {reason}")
    return reason is None


def unavailable_or_oom(err: Exception) -> str | None:
    """A side that cannot run here: a backend not built (ValueError) or out of memory."""
    if isinstance(err, ValueError):
        return f"unavailable ({err})"
    return harness.oom_status(err)


def return_stats_sides(
    h: torch.Tensor, w: torch.Tensor, h_t: torch.Tensor, h_r: torch.Tensor, backend: str
) -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """fused_pmi_kl forward and backward on one backend, without and with return_stats. Built here,
    not in main, so that no name in main keeps the inputs alive once main deletes them."""

    def call(stats: bool) -> tuple[torch.Tensor, ...]:
        out = fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0, check_finite=False, backend=backend, return_stats=stats)
        return torch.autograd.grad(out[0] if stats else out, (h, w))

    def plain_call() -> tuple[torch.Tensor, ...]:
        return call(False)

    def stats_call() -> tuple[torch.Tensor, ...]:
        return call(True)

    return {"plain": plain_call, "return_stats": stats_call}


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser(
        "fused", __doc__, devices=("cuda", "cpu"), repeats=10, dtype="auto", n=8192, hidden=4096, vocab=151936
    )
    parser.add_argument(
        "--memory-n",
        type=int,
        nargs="*",
        default=[8192, 32768, 131072],
        help="token counts at which pmi_kernels' peak extra memory is measured (GPU)",
    )
    args = harness.resolve(parser.parse_args(argv))
    harness.require_cuda(args, "this benchmark")
    device, dtype = args.device, args.dtype
    results = harness.Results("fused", args.out, device)
    print(results.device)
    workload = dict(n=args.n, hidden=args.hidden, vocab=args.vocab, dtype=harness.dtype_name(dtype))
    case = f"fused_pmi_kl fwd+bwd N={args.n} H={args.hidden} V={args.vocab}"
    h, w, h_t, h_r = impls.make_inputs(args.n, args.hidden, args.vocab, dtype, device)

    # Exactness at scale: the loss against plain torch on the same inputs.
    ours = fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0).item()
    plain = impls.plain_torch_pmi(h, w, h_t, h_r).mean().item()
    results.add(case, "pmi_kernels", "loss", ours, "nats", **workload)
    results.add(case, "plain torch", "loss", plain, "nats", **workload)
    print(f"loss: pmi_kernels {ours:.6f}  plain torch {plain:.6f}  rel diff {abs(ours - plain) / abs(plain):.2e}")

    # The timed comparison: every side interleaved, the floor first.
    keep = h.numel() * h.element_size() + w.numel() * w.element_size()
    sides, status, order = {}, {}, []
    for name, factory in {impls.FLOOR: impls.bare_gemms, **impls.GPU_IMPLEMENTATIONS}.items():
        order.append(name)
        try:
            sides[name] = impls.call_with(factory(h, w, h_t, h_r), True)
        except ImportError as err:
            status[name] = f"not installed ({err.name})"
    if device == "cuda" and usable("cuda", device) and torch.cuda.get_device_capability()[0] >= 9:
        cuda_side = impls.call_with(impls.pmi_kernels_cuda(h, w, h_t, h_r), True)
        for blocks in CLUSTERS:
            sides[f"pmi_kernels (cuda/c{blocks})"] = harness.in_cluster(cuda_side, blocks)
            order.append(f"pmi_kernels (cuda/c{blocks})")
    timings = harness.interleaved(sides, device, args.repeats, tolerate=unavailable_or_oom)
    times = {name: t.ms for name, t in timings.items() if t.ms is not None}
    floor = times.get(impls.FLOOR)
    for name in order:
        if name in status:
            results.add(case, name, "time", None, "ms", status[name], **workload)
            print(f"{name:48s} {status[name]}")
            continue
        timing = timings[name]
        results.add_time(case, timing, **workload)
        if timing.ms is None:
            print(f"{name:48s} {timing.status}")
            continue
        mem = None
        if device == "cuda" and name != impls.FLOOR and "/c" not in name:
            try:
                mem = harness.peak_extra_gib(sides[name], keep)
                results.add(case, name, "peak_extra_memory", mem, "GiB", **workload)
            except Exception as err:  # noqa: BLE001 (an OOM is a result; anything else is raised)
                if not harness.is_oom(err):
                    raise
                results.add(case, name, "peak_extra_memory", None, "GiB", "OOM", **workload)
                harness.empty_cuda_cache(device)
        shown = (
            f"{timing.ms:8.2f} ms"
            + (f"  x{timing.ms / floor:5.2f} floor" if floor else "")
            + (f"   extra {mem:6.2f} GiB" if mem is not None else "")
        )
        print(f"{name:48s} {shown}")
    del sides

    # return_stats: the per-token statistics from the same sweep, beside the plain call, interleaved.
    for backend in (b for b in BACKENDS if usable(b, device)):
        pair = harness.interleaved(return_stats_sides(h, w, h_t, h_r, backend), device, args.repeats)
        plain_ms, stats_ms = pair["plain"].ms, pair["return_stats"].ms
        side = f"pmi_kernels ({backend})"
        results.add(case, side, "time", plain_ms, "ms", **workload, return_stats=False)
        results.add(case, side, "time", stats_ms, "ms", **workload, return_stats=True)
        results.add_ratio(case, f"{side} return_stats", side, stats_ms / plain_ms, **workload)
        print(
            f"return_stats on {backend:6s}: {stats_ms:8.2f} ms vs {plain_ms:8.2f} ms  "
            f"({100 * (stats_ms / plain_ms - 1):+.1f}%, goal within 5%)"
        )

    del h, w, h_t, h_r
    harness.empty_cuda_cache(device)
    for n in args.memory_n if device == "cuda" else []:
        h, w, h_t, h_r = impls.make_inputs(n, args.hidden, args.vocab, dtype, device)
        scaled = dict(workload, n=n)
        for backend in (b for b in BACKENDS if usable(b, device)):
            run = impls.call_with(impls.pmi_kernels_with(backend)(h, w, h_t, h_r), True)
            mem = harness.peak_extra_gib(run, h.numel() * h.element_size() + w.numel() * w.element_size())
            ms = harness.median_ms(run, device, warmup_ms=1, rep_ms=1)
            label = f"fused_pmi_kl fwd+bwd N={n} H={args.hidden} V={args.vocab}"
            results.add(label, f"pmi_kernels ({backend})", "time", ms, "ms", **scaled)
            results.add(label, f"pmi_kernels ({backend})", "peak_extra_memory", mem, "GiB", **scaled)
            print(f"pmi_kernels ({backend}) at N={n:6d}: {ms:8.1f} ms, extra peak {mem:.2f} GiB")
            del run
        del h, w, h_t, h_r
        harness.empty_cuda_cache(device)

    for label, num, den, op, bound in GOALS:
        if times.get(num) is not None and times.get(den) is not None:
            ratio = times[num] / times[den]
            results.add_ratio(case, num, den, ratio, **workload, goal=f"{op} {bound}")
            print(f"{label + f' (goal {op} {bound})':48s} {ratio:6.3f}")
    results.close()


if __name__ == "__main__":
    main()
