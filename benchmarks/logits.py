"""pmi_kl over bf16 logits (three streams): the Triton and the CUDA row kernels against the
copy bandwidth.

Measured in one run, interleaved: a device-to-device copy (the bandwidth ceiling), pmi_kl forward
and forward+backward on each backend, with return_stats, plain torch on the same logits, Liger's
JSD kernel on two streams; then, interleaved with each other, the row kernels on the fused path's
two-stream shape (t - r from one GEMM, kappa given: 10 bytes per entry) and a sweep of the Triton
kernel's launch configurations (their fractions are of the copy bandwidth measured first).
On Hopper the CUDA kernel also runs with each row split over a cluster of 8 and of 16 blocks
("cuda/c8", "cuda/c16": PMI_KERNELS_CUDA_CLUSTER), whose later passes re-read from L2.

Bytes per vocabulary entry, by design (bf16 = 2 bytes a value):
    forward KL, 3 streams: kappa pass reads t, r (4) + pass 1 reads s, t, r (6)
                           + pass 2 reads s, t, r and writes grad (8)        = 18
    mixed JSD adds pass 3 (reads 6, writes 2) and pass 2 writes nothing      = 24
    backward: nothing, when the incoming gradient is the one the forward assumed
              (loss.backward() on the mean); otherwise a rescale (read 2, write 2) = +4
The minimum for forward+backward is 8 (read three streams once, write the gradient once).

    python -m benchmarks logits --out DIR                          # needs a GPU
    TRITON_INTERPRET=1 python -m benchmarks logits --device cpu --n 8 --vocab 512 --sweep-rows 4   # a CPU check
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pmi_kernels import pmi_kl
from pmi_kernels.backends import REGISTRY
from pmi_kernels.backends.triton.row_kernel import rows as triton_rows
from pmi_kernels.options import LossOptions

from . import harness

# The CUDA kernel with each row split over a cluster of blocks (PMI_KERNELS_CUDA_CLUSTER, Hopper).
CLUSTERS = (8, 16)
# The backward adds nothing when the incoming gradient is the one the forward assumed (here).
BYTES_PER_ENTRY = {"forward KL": {"fwd": 18, "fwd+bwd": 18}, "mixed JSD 0.5": {"fwd": 24, "fwd+bwd": 24}}
SWEEP = [(2048, 4), (2048, 8), (4096, 8)]
LOSSES = (("forward KL", 0.0), ("mixed JSD 0.5", 0.5))
PHASES = ("fwd", "fwd+bwd", "fwd+bwd, return_stats")


def variants(device: str) -> list[tuple[str, str, int | None]]:
    """(label, backend, cluster size): each backend, and on Hopper the CUDA kernel split."""
    backends = [b for b in ("triton", "cuda") if REGISTRY[b].unusable_on(device) is None]
    out: list[tuple[str, str, int | None]] = [(backend, backend, None) for backend in backends]
    if "cuda" in backends and torch.cuda.get_device_capability()[0] >= 9:
        out += [(f"cuda/c{blocks}", "cuda", blocks) for blocks in CLUSTERS]
    return out


def plain_torch_pmi_logits(s, t, r, clip=10.0):
    s = s.float()
    with torch.no_grad():
        delta = t.float().log_softmax(-1) - r.float().log_softmax(-1)
        delta = clip * torch.tanh((delta - delta.mean(-1, keepdim=True)) / clip)
        log_q = (s + delta).log_softmax(-1)
    log_p = s.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def pmi_kl_side(
    student: torch.Tensor, t: torch.Tensor, r: torch.Tensor, backend: str, jsd_beta: float, phase: str
) -> Callable[[], Any]:
    """pmi_kl on one backend in one phase: the forward, the forward and backward, or the
    forward and backward with return_stats."""
    stats = phase.endswith("return_stats")

    def side() -> Any:
        out = pmi_kl(student, t, r, jsd_beta=jsd_beta, check_finite=False, backend=backend, return_stats=stats)
        if phase == "fwd":
            return out
        return torch.autograd.grad(out[0] if stats else out, student)

    return side


def copy_side(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A device-to-device copy of src into dst: the bandwidth ceiling."""

    def copy() -> torch.Tensor:
        return dst.copy_(src)

    return copy


def plain_torch_side(student: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> Callable[[], Any]:
    """The forward KL over the logits in plain torch, forward and backward."""

    def plain_torch() -> Any:
        return torch.autograd.grad(plain_torch_pmi_logits(student, t, r), student)

    return plain_torch


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("logits", __doc__, devices=("cuda", "cpu"), repeats=20, n=8192, vocab=151936)
    parser.add_argument("--sweep-rows", type=int, default=2048, help="rows for the launch-config sweep")
    args = harness.resolve(parser.parse_args(argv))
    harness.require_cuda(args, "this benchmark")
    device = args.device
    results = harness.Results("logits", args.out, device)
    print(results.device)
    chosen = variants(device)
    print(f"backends: {tuple(b for name, b, blocks in chosen if blocks is None)}")
    n, vocab = args.n, args.vocab
    entries = n * vocab
    workload = dict(n=n, vocab=vocab, dtype="bf16", streams=3)
    gen = torch.Generator(device=device).manual_seed(0)
    s, t, r = (torch.randn(n, vocab, generator=gen, device=device, dtype=torch.bfloat16) * 3 for _ in range(3))
    student = s.clone().requires_grad_(True)
    dst = torch.empty_like(s)

    # Every side of the logits comparison, interleaved: the copy, each kernel, plain torch, Liger.
    # The sides are built by functions, so that no name here keeps the tensors deleted below alive.
    sides: dict[str, Callable[[], Any]] = {"copy": copy_side(dst, s)}
    for name, backend, blocks in chosen:
        for label, beta in LOSSES:
            for phase in PHASES:
                sides[f"{name} {label} {phase}"] = harness.in_cluster(
                    pmi_kl_side(student, t, r, backend, beta, phase), blocks
                )
    sides["plain torch forward KL fwd+bwd"] = plain_torch_side(student, t, r)
    liger = "liger JSD 2 streams (log-probs given) fwd+bwd"
    try:
        from liger_kernel.transformers import LigerJSD

        log_p = student.detach().float().log_softmax(-1).to(torch.bfloat16).requires_grad_(True)
        log_q = t.float().log_softmax(-1).to(torch.bfloat16)
        jsd = LigerJSD(beta=0.5)

        def liger_jsd() -> Any:
            return torch.autograd.grad(jsd(log_p, log_q), log_p)

        sides[liger] = liger_jsd
    except ImportError:
        results.add(
            f"pmi_kl N={n} V={vocab}", "liger JSD", "time", None, "ms", "liger-kernel not installed", **workload
        )
    timings = harness.interleaved(sides, device, args.repeats)
    ms = {name: timing.ms for name, timing in timings.items()}
    case = f"pmi_kl N={n} V={vocab}"
    copy_bw = 2 * s.numel() * s.element_size() / ms["copy"] / 1e6  # GB/s
    results.add_time(case, timings["copy"], **workload)
    results.add(case, "copy", "bandwidth", copy_bw / 1e3, "TB/s", **workload)
    print(f"copy bandwidth {copy_bw / 1e3:.2f} TB/s (read + write)")
    for name, _backend, _blocks in chosen:
        for label, _beta in LOSSES:
            for phase in PHASES:
                key = f"{name} {label} {phase}"
                moved = BYTES_PER_ENTRY[label][phase.split(",")[0]] * entries
                frac = moved / ms[key] / 1e6 / copy_bw
                params = dict(workload, loss=label, phase=phase, bytes=moved)
                results.add_time(case, timings[key], **params)
                results.add(case, key, "fraction_of_copy_bandwidth", frac, "fraction", **params)
                print(
                    f"{name:8s} {label:14s} {phase:22s} {ms[key]:8.2f} ms  {moved / ms[key] / 1e6:7.0f} GB/s"
                    f"  = {100 * frac:5.1f}% of copy"
                )
    plain = "plain torch forward KL fwd+bwd"
    results.add_time(case, timings[plain], **workload)
    triton = "triton forward KL fwd+bwd"
    if triton in ms:
        results.add_ratio(case, plain, triton, ms[plain] / ms[triton], **workload)
        print(f"plain torch forward KL fwd+bwd {ms[plain]:8.2f} ms  (x{ms[plain] / ms[triton]:.2f} the Triton kernel)")
    else:
        print(f"plain torch forward KL fwd+bwd {ms[plain]:8.2f} ms")
    if liger in timings:
        results.add_time(case, timings[liger], **workload)
        print(f"liger JSD, 2 streams, fwd+bwd {ms[liger]:8.2f} ms")
    del sides, timings, student, r, dst
    harness.empty_cuda_cache(device)

    # The fused path's shape: s and t - r, kappa given, forward KL, the gradient over s; each
    # kernel and each launch configuration of the Triton kernel, interleaved.
    m = args.sweep_rows
    s2, d2, grad = s[:m], t[:m], torch.empty_like(s[:m])
    kappa = torch.zeros(m, device=device)
    opts = LossOptions(pmi=True, jsd_beta=0.0)

    def row_kernel(backend: str) -> Callable[[], Any]:
        def side() -> Any:
            return REGISTRY[backend].rows(s2, d2, opts=opts, kappa=kappa, grad_out=grad)

        return side

    def triton_config(block: int, warps: int) -> Callable[[], Any]:
        def side() -> Any:
            return triton_rows(s2, d2, opts=opts, kappa=kappa, grad_out=grad, block=block, num_warps=warps)

        return side

    shape_sides = {name: harness.in_cluster(row_kernel(backend), blocks) for name, backend, blocks in chosen}
    if any(backend == "triton" for _, backend, _ in chosen):
        shape_sides.update({f"{block}x{warps}": triton_config(block, warps) for block, warps in SWEEP})
    shape = harness.interleaved(shape_sides, device, args.repeats)
    case = f"row kernel, fused shape, M={m} V={vocab}"
    params = dict(m=m, vocab=vocab, dtype="bf16", bytes_per_entry=10)
    for name, _, _ in chosen:
        bw = 10 * m * vocab / shape[name].ms / 1e6
        results.add_time(case, shape[name], **params)
        results.add(case, name, "fraction_of_copy_bandwidth", bw / copy_bw, "fraction", **params)
        print(
            f"{name:8s} row kernel, fused shape: {shape[name].ms:6.3f} ms  {bw:6.0f} GB/s = "
            f"{100 * bw / copy_bw:5.1f}% of copy (10 B/entry)"
        )
    for block, warps in SWEEP if f"{SWEEP[0][0]}x{SWEEP[0][1]}" in shape else []:
        timing = shape[f"{block}x{warps}"]
        bw = 10 * m * vocab / timing.ms / 1e6
        results.add_time(case, timing, **params, block=block, num_warps=warps)
        print(
            f"triton row kernel, fused shape, BLOCK_V={block:5d} warps={warps:2d}: {timing.ms:6.3f} ms  {bw:6.0f}"
            f" GB/s = {100 * bw / copy_bw:5.1f}% of copy"
        )
    results.close()


if __name__ == "__main__":
    main()
