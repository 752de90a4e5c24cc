"""fused_pmi_kl on the headline workload of ANCHORS: hidden states + lm_head -> loss and gradients.

Everything is measured in one run on one device: the four bare GEMMs the loss cannot avoid
(the floor), pmi_kernels (Triton row kernel, and its chunked plain-torch backend), the
obvious plain-torch code with fp32 logits materialized, and Liger's fused losses when
installed. Prints the ratios the issue sets as goals and writes JSON.

    python benchmarks/bench_fused.py --out benchmarks/results          # on a GPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, is_oom, median_ms, peak_extra_gib, slug, write_json  # noqa: E402

from pmi_kernels import fused_pmi_kl  # noqa: E402


def make_inputs(n, hidden, vocab, dtype, device, logit_scale=3.0):
    """Hidden states ~ N(0, 1) and a head scaled so logits have std ~ logit_scale."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    weight = (x(vocab, hidden) * (logit_scale / hidden ** 0.5)).requires_grad_(True)
    return x(n, hidden).requires_grad_(True), weight, x(n, hidden), x(n, hidden)


def plain_torch_pmi(h, w, h_t, h_r, clip=10.0):
    """What a user writes first: fp32 logits for every stream, autograd for the gradient."""
    s = (h @ w.T).float()
    with torch.no_grad():
        t = (h_t @ w.T).float()
        r = (h_r @ w.T).float()
        delta = t.log_softmax(-1) - r.log_softmax(-1)
        delta = clip * torch.tanh((delta - delta.mean(-1, keepdim=True)) / clip)
        log_q = (s + delta).log_softmax(-1)
    log_p = s.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean()


def chunked_pmi_target(h, w, h_t, h_r, chunk=1024, clip=10.0):
    """The PMI target q [N, V] in fp32, built chunk by chunk, to feed a loss that takes q."""
    q = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            s = (h[i:i + chunk] @ w.T).float()
            delta = (h_t[i:i + chunk] - h_r[i:i + chunk]) @ w.T
            delta = delta.float() - delta.float().mean(-1, keepdim=True)
            q[i:i + chunk] = (s + clip * torch.tanh(delta / clip)).softmax(-1)
    return q


def implementations(h, w, h_t, h_r):
    """name -> fn() running forward + backward and returning the gradients it produced."""
    grads = lambda loss: torch.autograd.grad(loss, (h, w))  # noqa: E731
    impls = {
        "pmi_kernels triton": lambda: grads(fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0, check_finite=False)),
        "pmi_kernels torch-chunked": lambda: grads(fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0, check_finite=False,
                                                                backend="torch")),
        "plain torch (fp32 logits)": lambda: grads(plain_torch_pmi(h, w, h_t, h_r)),
        "pmi_kernels triton, opsd 2-stream jsd0.5": lambda: grads(fused_pmi_kl(h, w, h_t, jsd_beta=0.5,
                                                                               check_finite=False)),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD, LigerFusedLinearKLDivLoss
    except ImportError:
        return impls, "liger-kernel not installed"
    jsd = LigerFusedLinearJSD(jsd_beta=0.5)
    kl = LigerFusedLinearKLDivLoss(reduction="batchmean")
    impls["liger FusedLinearJSD, opsd 2-stream jsd0.5"] = lambda: grads(jsd(h, w, h_t, w.detach(), None))
    impls["liger FusedLinearKLDiv + chunked PMI target"] = lambda: grads(kl(h, w, chunked_pmi_target(h, w, h_t, h_r)))
    return impls, None


def bare_gemms(h, w, h_t, h_r):
    """The floor: student logits, one product for t - r, and the two backward products."""
    diff = (h_t - h_r).detach()
    dz = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)
    hd, wd = h.detach(), w.detach()

    def run():
        hd @ wd.T
        diff @ wd.T
        dz @ wd
        dz.T @ hd
    return run


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
    dtype = torch.bfloat16
    info = device_info("cuda")
    print(info)
    h, w, h_t, h_r = make_inputs(args.n, args.hidden, args.vocab, dtype, "cuda")
    flops_per_gemm = 2 * args.n * args.vocab * args.hidden
    results = {"workload": dict(n=args.n, hidden=args.hidden, vocab=args.vocab, dtype="bf16",
                                loss="PMI target, forward KL(q||p), clip 10, centered; grads to h and W"),
               "info": info, "times_ms": {}, "peak_extra_gib": {}}
    floor = median_ms(bare_gemms(h, w, h_t, h_r), "cuda")
    results["times_ms"]["bare 4 GEMMs"] = floor
    print(f"{'bare 4 GEMMs':48s} {floor:8.2f} ms   {4 * flops_per_gemm / floor / 1e9:6.0f} TFLOP/s")
    torch.cuda.empty_cache()

    # Exactness at scale: the loss against plain torch on the same inputs.
    ours = fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0).item()
    plain = plain_torch_pmi(h, w, h_t, h_r).item()
    results["loss"] = {"pmi_kernels": ours, "plain torch": plain}
    print(f"loss: pmi_kernels {ours:.6f}  plain torch {plain:.6f}  rel diff {abs(ours - plain) / abs(plain):.2e}")

    impls, liger_note = implementations(h, w, h_t, h_r)
    results["liger"] = liger_note or "installed"
    keep = h.numel() * h.element_size() + w.numel() * w.element_size()
    for name, fn in impls.items():
        try:
            ms = median_ms(fn, "cuda")
            mem = peak_extra_gib(fn, keep)
        except Exception as err:  # noqa: BLE001 (an OOM is a result, anything else is re-raised)
            if not is_oom(err):
                raise
            ms, mem = "OOM", "OOM"
            torch.cuda.empty_cache()
        results["times_ms"][name], results["peak_extra_gib"][name] = ms, mem
        shown = f"{ms:8.2f} ms  x{ms / floor:5.2f} floor   extra {mem:6.2f} GiB" if ms != "OOM" else "OOM"
        print(f"{name:48s} {shown}")

    del h, w, h_t, h_r
    torch.cuda.empty_cache()
    results["memory_scaling"] = {}
    for n in args.memory_n:
        hn, wn, htn, hrn = make_inputs(n, args.hidden, args.vocab, dtype, "cuda")
        fn = lambda: torch.autograd.grad(fused_pmi_kl(hn, wn, htn, hrn, jsd_beta=0.0, check_finite=False), (hn, wn))  # noqa: E731
        keep = hn.numel() * hn.element_size() + wn.numel() * wn.element_size()
        mem = peak_extra_gib(fn, keep)
        ms = median_ms(fn, "cuda", warmup_ms=1, rep_ms=1)
        results["memory_scaling"][n] = {"ms": ms, "peak_extra_gib": mem}
        print(f"pmi_kernels triton at N={n:6d}: {ms:8.1f} ms, extra peak {mem:.2f} GiB")
        del hn, wn, htn, hrn
        torch.cuda.empty_cache()

    t = results["times_ms"]
    ratios = {"pmi_kernels / bare GEMMs (goal <= 1.15)": t["pmi_kernels triton"] / floor}
    if t["plain torch (fp32 logits)"] != "OOM":
        ratios["plain torch / pmi_kernels (goal >= 1.9)"] = t["plain torch (fp32 logits)"] / t["pmi_kernels triton"]
    liger_jsd = t.get("liger FusedLinearJSD, opsd 2-stream jsd0.5")
    if isinstance(liger_jsd, float):
        ratios["liger FLJSD / pmi_kernels opsd (goal > 1)"] = liger_jsd / t["pmi_kernels triton, opsd 2-stream jsd0.5"]
    results["ratios"] = ratios
    for k, v in ratios.items():
        print(f"{k:48s} {v:6.3f}")
    write_json(os.path.join(args.out, f"fused_{slug(info['device'])}_{info['date']}.json"), results)


if __name__ == "__main__":
    main()
