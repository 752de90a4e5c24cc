"""The PMI-KL contract (docs/loss.md) in plain PyTorch: its executable form.

Materializes every [N, V] tensor on purpose and lets autograd find the gradient, so it
shares no code with the fast paths and can be gradchecked in float64. It computes in
the input's precision, upcast to at least float32.

Readings of the contract, where SPEC leaves a choice:
- Without an anchor stream the target's base is the student's own scaled logits with the
  gradient stopped (a = s.detach()), so the target moves with the student but never
  passes gradient.
- jsd_beta = 0 is KL(q || p) and jsd_beta = 1 is KL(p || q) exactly, not the limits of
  the mixture (which are 0); this is TRL GKD's and OPSD's convention.
- entry_clip clamps each per-vocabulary summand with torch.clamp(max=e): a summand
  strictly above e passes no gradient (at equality torch passes it; the fast paths agree
  up to that measure-zero tie).
- Masked-out positions are removed with torch.where, so their gradient is exactly 0.
- reduction="none" returns mask_n * loss_n in the inputs' leading shape ([B, T] for [B, T, V]
  logits, [N] for [N, V]), as torch's own losses do; the mask has that shape too.
- In the fused-linear form the logits are h @ W^T + b computed in the compute dtype
  (upcast inputs); the frozen streams use (frozen_weight, frozen_bias), each defaulting
  on its own to the student's (W or b), detached: a frozen base weight with the student's
  bias is a LoRA'd head's usual case.
- Standard OPSD mode (no reference-only stream) ignores the anchor stream: q = softmax(t).
- Diagnostics need the reference-only stream; cosines of a zero vector are 0.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .options import LossOptions


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def log_ratio(x, y):
    """log p_X - log p_Y as (x - y) - (lse x - lse y): per stream, x - lse x would round lse x away
    beside a masked logit of -1e30 (fp64 too), and in fp32 (x - lse x) - (y - lse y) cancels to
    the logits' ulp where x and y share a confident token at 1e5."""
    return (x - y) - (x.logsumexp(-1, keepdim=True) - y.logsumexp(-1, keepdim=True))


def pmi_target_logits(s, t, r=None, a=None, opts: LossOptions = LossOptions()):
    """The target's logits g (q = softmax(g)) from *scaled* logits; no gradient flows."""
    with torch.no_grad():
        if r is None:
            return t.clone()
        delta = log_ratio(t, r)
        if opts.center:
            delta = delta - delta.mean(-1, keepdim=True)
        if opts.clip is not None:
            delta = opts.clip * torch.tanh(delta / opts.clip)
        base = s.detach() if a is None else a
        return base + delta / opts.beta


def generalized_jsd(student_logprobs, target_logprobs, jsd_beta: float, entry_clip=None):
    """Per-row loss: forward KL, reverse KL, or the λ-mixture JSD, summed over the last dim."""
    summand = jsd_summands(student_logprobs, target_logprobs, jsd_beta)
    if entry_clip is not None:
        summand = summand.clamp(max=entry_clip)
    return summand.sum(-1)


def jsd_summands(student_logprobs, target_logprobs, jsd_beta: float):
    """The loss's per-entry summands, before entry_clip."""
    lp, lq = student_logprobs, target_logprobs
    if jsd_beta == 0.0:
        summand = lq.exp() * (lq - lp)
    elif jsd_beta == 1.0:
        summand = lp.exp() * (lp - lq)
    else:
        lam = jsd_beta
        lm = torch.logsumexp(
            torch.stack(
                [
                    lp + torch.log1p(torch.tensor(-lam, dtype=lp.dtype)),
                    lq + torch.log(torch.tensor(lam, dtype=lp.dtype)),
                ]
            ),
            dim=0,
        )
        summand = lam * lq.exp() * (lq - lm) + (1 - lam) * lp.exp() * (lp - lm)
    return summand


def reduce_loss(per_row, mask, reduction: str):
    per_row = per_row if mask is None else torch.where(mask, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    count = per_row.numel() if mask is None else int(mask.sum())
    return total / max(1, count)


def pmi_kl_reference(
    student_logits,
    teacher_logits,
    refonly_logits=None,
    anchor_logits=None,
    *,
    mask=None,
    beta=1.0,
    clip=10.0,
    center=True,
    temperature=1.0,
    jsd_beta=0.5,
    entry_clip=None,
    reduction="mean",
):
    opts = LossOptions(
        pmi=refonly_logits is not None,
        beta=beta,
        clip=clip,
        center=center,
        temperature=temperature,
        jsd_beta=jsd_beta,
        entry_clip=entry_clip,
    )
    dtype = compute_dtype(student_logits.dtype)

    def scale(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.to(dtype) / opts.temperature

    s, t, r, a = map(scale, (student_logits, teacher_logits, refonly_logits, anchor_logits))
    target = pmi_target_logits(s, t, r, a, opts)
    per_row = generalized_jsd(s.log_softmax(-1), target.log_softmax(-1), opts.jsd_beta, opts.entry_clip)
    return reduce_loss(per_row, mask, reduction)


def linear_logits(hidden, weight, bias=None):
    dtype = compute_dtype(hidden.dtype)
    return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def frozen_head(lm_head_weight, lm_head_bias, frozen_weight, frozen_bias):
    """(W_f, b_f): each defaults on its own to the student's, detached."""
    w_f = lm_head_weight if frozen_weight is None else frozen_weight
    b_f = lm_head_bias if frozen_bias is None else frozen_bias
    return w_f.detach(), None if b_f is None else b_f.detach()


def fused_pmi_kl_reference(
    student_hidden,
    lm_head_weight,
    teacher_hidden,
    refonly_hidden=None,
    anchor_hidden=None,
    *,
    lm_head_bias=None,
    frozen_weight=None,
    frozen_bias=None,
    **loss_kwargs,
):
    w_f, b_f = frozen_head(lm_head_weight, lm_head_bias, frozen_weight, frozen_bias)

    def frozen(h: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if h is None else linear_logits(h.detach(), w_f, b_f)

    return pmi_kl_reference(
        linear_logits(student_hidden, lm_head_weight, lm_head_bias),
        frozen(teacher_hidden),
        frozen(refonly_hidden),
        frozen(anchor_hidden),
        **loss_kwargs,
    )


def _cosine(x, y):
    tiny = torch.finfo(x.dtype).tiny
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(tiny)


def pmi_diagnostics_reference(
    student_logits,
    teacher_logits,
    refonly_logits,
    anchor_logits=None,
    *,
    beta=1.0,
    clip=10.0,
    center=True,
    temperature=1.0,
) -> Dict[str, torch.Tensor]:
    """The paper's decomposition of the teacher signal, per position (leading shape kept)."""
    opts = LossOptions(pmi=True, beta=beta, clip=clip, center=center, temperature=temperature)
    dtype = compute_dtype(student_logits.dtype)

    def scale(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.detach().to(dtype) / opts.temperature

    s, t, r, a = map(scale, (student_logits, teacher_logits, refonly_logits, anchor_logits))
    lp, lt = s.log_softmax(-1), t.log_softmax(-1)
    lq = pmi_target_logits(s, t, r, a, opts).log_softmax(-1)
    total, ref, inter = log_ratio(t, s), log_ratio(r, s), log_ratio(t, r)
    return {
        "cos_total_ref": _cosine(total, ref),
        "cos_total_pmi": _cosine(total, inter),
        "norm_ratio_ref_total": ref.norm(dim=-1) / total.norm(dim=-1).clamp_min(torch.finfo(dtype).tiny),
        "kl_teacher_student": (lt.exp() * total).sum(-1),
        "kl_target_student": (lq.exp() * (lq - lp)).sum(-1),
        "entropy_student": -(lp.exp() * lp).sum(-1),
        "entropy_target": -(lq.exp() * lq).sum(-1),
    }
