"""The row operation in plain torch: a chunk of logit rows -> per-row loss and dloss/ds_raw.

This is the arithmetic every kernel implements, written with whole-row torch ops (backend
"torch", over chunks of rows). The gradient is analytic, not autograd, so it also documents
what the kernels compute:

    A_v = k_v * dsummand_v / dlogp_v       (k_v = 0 where entry_clip clamps the summand)
    dloss/ds_v = (A_v - p_v * sum_u A_u) / tau

with dsummand/dlogp = -q (forward KL), p (log p - log q + 1) (reverse KL) and
(1 - λ) p (log p - log m) (mixed JSD); forward KL without entry_clip is simply p - q.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...options import FORWARD_KL, REVERSE_KL, LossOptions, compute_dtype


def target_shift(t, r, opts: LossOptions):
    """kappa: the per-row constant subtracted from t - r before the soft clip (scaled units)."""
    if opts.center:
        return (t - r).mean(-1) if r is not None else t.mean(-1)
    return t.logsumexp(-1) - r.logsumexp(-1)


def target_logits(s, t, r, a, kappa, opts: LossOptions):
    """g from scaled logits. With r None in PMI mode, t already holds t - r."""
    if not opts.pmi:
        return t
    delta = t - r if r is not None else t
    if opts.needs_kappa:
        if kappa is None:
            kappa = target_shift(t, r, opts)
        delta = opts.clip * torch.tanh((delta - kappa[:, None]) / opts.clip)
    return (s if a is None else a) + delta / opts.beta


def summand_and_slope(lp, lq, opts: LossOptions, slope: bool = True):
    """The per-vocabulary loss summand and (if asked) its derivative with respect to log p."""
    kind = opts.loss_kind
    if kind == FORWARD_KL:
        q = lq.exp()
        return q * (lq - lp), -q if slope else None
    p = lp.exp()
    if kind == REVERSE_KL:
        return p * (lp - lq), p * (lp - lq + 1) if slope else None
    lam = opts.jsd_beta
    lm = torch.logaddexp(lp + math.log1p(-lam), lq + math.log(lam))
    summand = lam * lq.exp() * (lq - lm) + (1 - lam) * p * (lp - lm)
    return summand, (1 - lam) * p * (lp - lm) if slope else None


def row_stats(lp, lq):
    """[C, 3]: KL(q || p), H(p), H(q) per row (backends.STATS order)."""
    p, q = lp.exp(), lq.exp()
    return torch.stack([(q * (lq - lp)).sum(-1), -(p * lp).sum(-1), -(q * lq).sum(-1)], dim=-1)


def rows(s_raw, t_raw, r_raw=None, a_raw=None, *, opts: LossOptions, kappa: Optional[torch.Tensor] = None,
         mask: Optional[torch.Tensor] = None, row_scale: Optional[torch.Tensor] = None,
         grad_out: Optional[torch.Tensor] = None, stats_out: Optional[torch.Tensor] = None):
    """Per-row loss [C] (compute dtype) of raw logit rows [C, V]; writes row_scale * dloss/ds_raw
    into grad_out (any float dtype, may alias s_raw) and the row statistics into stats_out
    when given. Masked rows give exactly 0."""
    dtype = compute_dtype(s_raw.dtype)
    inv_tau = 1.0 / opts.temperature
    scale = lambda x: None if x is None else x.to(dtype) * inv_tau  # noqa: E731
    s, t, r, a = map(scale, (s_raw, t_raw, r_raw, a_raw))
    g = target_logits(s, t, r, a, kappa, opts)
    lp, lq = s.log_softmax(-1), g.log_softmax(-1)
    summand, slope = summand_and_slope(lp, lq, opts, slope=grad_out is not None)
    if opts.entry_clip is not None:
        if slope is not None:
            slope = slope.masked_fill(summand > opts.entry_clip, 0.0)
        summand = summand.clamp(max=opts.entry_clip)
    keep = (lambda x: x) if mask is None else (lambda x: torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, 0.0))
    loss = keep(summand.sum(-1))
    if stats_out is not None:
        stats_out.copy_(keep(row_stats(lp, lq)))
    if grad_out is None:
        return loss
    if opts.fast_grad:
        grad = lp.exp() - lq.exp()
    else:
        grad = slope - lp.exp() * slope.sum(-1, keepdim=True)
    grad = grad * inv_tau if row_scale is None else grad * (row_scale.to(dtype)[:, None] * inv_tau)
    grad_out.copy_(keep(grad))
    return loss
