"""The implementations every benchmark compares, on one problem: hidden states + lm_head -> the
three-stream PMI-KL loss (forward KL, clip 10, centered) and the gradients to h and W.

Each factory takes the inputs and returns fn(backward: bool) or raises ImportError (with a
reason) when the implementation is not available here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pmi_kernels import fused_pmi_kl

CLIP = 10.0


def make_inputs(n, hidden, vocab, dtype, device, logit_scale=3.0, seed=0):
    """Hidden states ~ N(0, 1) and a head scaled so logits have std ~ logit_scale."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def x(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    weight = (x(vocab, hidden) * (logit_scale / hidden**0.5)).requires_grad_(True)
    return x(n, hidden).requires_grad_(True), weight, x(n, hidden), x(n, hidden)


def _run(loss_fn, h, w, backward):
    if backward:
        return torch.autograd.grad(loss_fn(), (h, w))
    with torch.no_grad():
        return loss_fn()


def plain_torch_pmi(h, w, h_t, h_r):
    """What a user writes first: fp32 logits for every stream, autograd for the gradient."""
    s = (h @ w.T).float()
    with torch.no_grad():
        delta = (h_t @ w.T).float().log_softmax(-1) - (h_r @ w.T).float().log_softmax(-1)
        delta = CLIP * torch.tanh((delta - delta.mean(-1, keepdim=True)) / CLIP)
        log_q = (s + delta).log_softmax(-1)
    log_p = s.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def pmi_kernels_with(backend):
    """fused_pmi_kl on one backend (the registry's names: "triton", "cuda", "cpu", "torch", "auto")."""

    def factory(h, w, h_t, h_r):
        return lambda backward: _run(
            lambda: fused_pmi_kl(h, w, h_t, h_r, jsd_beta=0.0, check_finite=False, backend=backend), h, w, backward
        )

    return factory


pmi_kernels_triton, pmi_kernels_cuda = pmi_kernels_with("triton"), pmi_kernels_with("cuda")
pmi_kernels_cpu, pmi_kernels_torch = pmi_kernels_with("cpu"), pmi_kernels_with("torch")


def plain_torch(h, w, h_t, h_r):
    return lambda backward: _run(lambda: plain_torch_pmi(h, w, h_t, h_r).mean(), h, w, backward)


def plain_torch_chunked(h, w, h_t, h_r, chunk=1024):
    """What a careful user writes: 1,024-row chunks, each chunk's backward run at once."""

    def run(backward):
        n = h.shape[0]
        if not backward:
            with torch.no_grad():
                return (
                    sum(
                        plain_torch_pmi(h[i : i + chunk], w, h_t[i : i + chunk], h_r[i : i + chunk]).sum()
                        for i in range(0, n, chunk)
                    )
                    / n
                )
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        for i in range(0, n, chunk):
            hc = h[i : i + chunk].detach().requires_grad_(True)
            loss = plain_torch_pmi(hc, w, h_t[i : i + chunk], h_r[i : i + chunk]).sum() / n
            gh, gw = torch.autograd.grad(loss, (hc, w))
            grad_h[i : i + chunk] = gh
            grad_w += gw
        return grad_h, grad_w

    return run


def liger_jsd_opsd(h, w, h_t, h_r):
    """Liger's FusedLinearJSD on two streams (standard OPSD: no reference-only stream)."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.5)
    return lambda backward: _run(lambda: jsd(h, w, h_t, w.detach(), None), h, w, backward)


def pmi_kernels_opsd(h, w, h_t, h_r):
    """pmi_kernels (backend "auto") in the same standard-OPSD mode and JSD as the Liger row above."""
    return lambda backward: _run(lambda: fused_pmi_kl(h, w, h_t, jsd_beta=0.5, check_finite=False), h, w, backward)


def chunked_pmi_target(h, w, h_t, h_r, chunk=1024):
    """The PMI target q [N, V] in fp32, built chunk by chunk, for losses that take q."""
    q = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            s = (h[i : i + chunk] @ w.T).float()
            delta = ((h_t[i : i + chunk] - h_r[i : i + chunk]) @ w.T).float()
            delta = delta - delta.mean(-1, keepdim=True)
            q[i : i + chunk] = (s + CLIP * torch.tanh(delta / CLIP)).softmax(-1)
    return q


def liger_kl_pmi_target(h, w, h_t, h_r):
    """Liger's fused linear KL-divergence loss fed the PMI target, built in chunks."""
    from liger_kernel.transformers import LigerFusedLinearKLDivLoss

    kl = LigerFusedLinearKLDivLoss(reduction="batchmean")
    return lambda backward: _run(lambda: kl(h, w, chunked_pmi_target(h, w, h_t, h_r)), h, w, backward)


def bare_gemms(h, w, h_t, h_r):
    """The floor: the student logits and one product for t - r (forward), and the two
    backward products dZ W and dZ^T h (backward), at full size, outputs in the input dtype."""
    diff = (h_t - h_r).detach()
    hd, wd = h.detach(), w.detach()
    dz = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)

    def run(backward):
        hd @ wd.T
        diff @ wd.T
        if backward:
            dz @ wd
            dz.T @ hd

    return run


GPU_IMPLEMENTATIONS = {
    "pmi_kernels (triton)": pmi_kernels_triton,
    "pmi_kernels (cuda)": pmi_kernels_cuda,
    "pmi_kernels (torch backend)": pmi_kernels_torch,
    "plain torch": plain_torch,
    "plain torch, 1k-row chunks": plain_torch_chunked,
    "liger FusedLinearKLDiv + chunked PMI target": liger_kl_pmi_target,
    "pmi_kernels (auto), opsd 2 streams, jsd 0.5": pmi_kernels_opsd,
    "liger FusedLinearJSD, opsd 2 streams, jsd 0.5": liger_jsd_opsd,
}
CPU_IMPLEMENTATIONS = {
    "pmi_kernels (cpu)": pmi_kernels_cpu,
    "pmi_kernels (torch backend)": pmi_kernels_torch,
    "plain torch": plain_torch,
    "plain torch, 1k-row chunks": plain_torch_chunked,
}
FLOOR = "bare GEMMs"


def implementations_for(device: str) -> dict[str, Callable]:
    """The implementations a device runs (the floor aside)."""
    return GPU_IMPLEMENTATIONS if device == "cuda" else CPU_IMPLEMENTATIONS


def call_with(run: Callable[[bool], Any], backward: bool) -> Callable[[], Any]:
    """An implementation's fn(backward) as a side of a timed run."""

    def side() -> Any:
        return run(backward)

    return side
