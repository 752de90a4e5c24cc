"""What the vocabulary-parallel machinery costs: fused_pmi_kl with a process group of size 1 (the
phases, the all-reduces, the chunk plan over the widest shard) against the plain call, measured
interleaved in one run on one device. Goal on a GPU: at most 1.02x. The shape is the device's
(below) unless --n, --hidden or --vocab (0: the device's) say otherwise.

    python -m benchmarks vocab_parallel --out DIR     # a GPU: the headline shape (NCCL)
                                                      # a CPU: a small shape (gloo)
    python -m benchmarks vocab_parallel --device cpu --n 64 --repeats 2   # quick
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist

from pmi_kernels import fused_pmi_kl

from . import harness
from . import implementations as impls

# (n, hidden, vocab, dtype) by device.
SHAPES = {"cuda": (8192, 4096, 151936, torch.bfloat16), "cpu": (512, 256, 32000, torch.float32)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("vocab_parallel", __doc__, repeats=10, n=0, hidden=0, vocab=0)
    args = harness.resolve(parser.parse_args(argv))
    device = args.device
    n, hidden, vocab, dtype = SHAPES[device]
    n, hidden, vocab = args.n or n, args.hidden or hidden, args.vocab or vocab
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1
        )
        try:
            group = dist.new_group([0])
            h, w, h_t, h_r = impls.make_inputs(n, hidden, vocab, dtype, device)

            def call(process_group: dist.ProcessGroup | None) -> tuple[torch.Tensor, ...]:
                loss = fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0, check_finite=False, process_group=process_group)
                return torch.autograd.grad(loss, (h, w))

            def plain() -> tuple[torch.Tensor, ...]:
                return call(None)

            def grouped() -> tuple[torch.Tensor, ...]:
                return call(group)

            timings = harness.interleaved({"plain": plain, "process group of 1": grouped}, device, args.repeats)
        finally:
            dist.destroy_process_group()
    results = harness.Results("vocab_parallel", args.out, device)
    ms = {name: timing.ms for name, timing in timings.items()}
    ratio = ms["process group of 1"] / ms["plain"]
    print(results.device)
    case = f"fused_pmi_kl fwd+bwd N={n} H={hidden} V={vocab}"
    params = dict(n=n, hidden=hidden, vocab=vocab, dtype=harness.dtype_name(dtype))
    for timing in timings.values():
        results.add_time(case, timing, **params)
    results.add_ratio(case, "process group of 1", "plain", ratio, **params, goal="<= 1.02 on a GPU")
    print(
        f"fused_pmi_kl fwd+bwd N={n} H={hidden} V={vocab} {str(dtype)[6:]}: plain {ms['plain']:.2f} ms, "
        f"process group of 1 {ms['process group of 1']:.2f} ms, ratio {ratio:.3f} (goal on a GPU: <= 1.02)"
    )
    results.close()


if __name__ == "__main__":
    main()
