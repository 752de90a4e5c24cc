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
from ..contract import Phase, check_phase_tensors


def row_lse_parts(x):
    """(max, log sum exp(x - max)) per row, keepdim, the sum accumulated in float64."""
    m = x.amax(-1, keepdim=True)
    return m, (x - m).exp().sum(-1, keepdim=True, dtype=torch.float64).log().to(x.dtype)


def log_ratio(t, r, t_parts=None, r_parts=None):
    """log p_T - log p_R = (t - r) - (max t - max r) - (log z_t - log z_r), the first two terms
    summed in float64, where both differences of float32 numbers are exact: in float32 they
    would cancel to the logits' ulp at |x| ~ 1e5 (one stream's logit far above the other's, or
    both far above the rest). t_parts, r_parts: the rows' row_lse_parts, when known."""
    (m_t, log_z_t), (m_r, log_z_r) = t_parts or row_lse_parts(t), r_parts or row_lse_parts(r)

    def wide(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64)

    shifted = ((wide(t) - wide(r)) - (wide(m_t) - wide(m_r))).to(t.dtype)
    return shifted - (log_z_t - log_z_r)


def target_logits(s, t, r, a, kappa, opts: LossOptions):
    """g from scaled logits. With r None in PMI mode, t already holds t - r. kappa: the per-row
    shift of t - r under the soft clip, when given (vocabulary-parallel, or the fused path's
    centering mean)."""
    if not opts.pmi:
        return t
    if opts.needs_kappa and kappa is None and not opts.center:
        delta = opts.clip * torch.tanh(log_ratio(t, r) / opts.clip)
    else:
        delta = t - r if r is not None else t
        if opts.needs_kappa:
            if kappa is None:  # the centering mean
                kappa = delta.mean(-1)
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


def log_softmax(x):
    """(x - max) - log sum exp(x - max), the sum accumulated in float64: beside a confident row's
    largest term, its many tiny ones would round away in a float32 sum."""
    m, log_z = row_lse_parts(x)
    return (x - m) - log_z


def local_lse(x):
    """[C, 2]: the row maximum and the sum of exp(x - max), over this part of the vocabulary."""
    m = x.max(-1).values
    return torch.stack([m, (x - m[:, None]).exp().sum(-1)], -1)


def _scaled(x: Optional[torch.Tensor], dtype: torch.dtype, inv_tau: float) -> Optional[torch.Tensor]:
    return None if x is None else x.to(dtype) * inv_tau


def rows(
    s_raw,
    t_raw,
    r_raw=None,
    a_raw=None,
    *,
    opts: LossOptions,
    phase: Phase = Phase.ALL,
    kappa: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    grad_out: Optional[torch.Tensor] = None,
    stats_out: Optional[torch.Tensor] = None,
    lse_out: Optional[torch.Tensor] = None,
    lse_in: Optional[torch.Tensor] = None,
    slope_sum_out: Optional[torch.Tensor] = None,
    slope_sum_in: Optional[torch.Tensor] = None,
):
    """The row contract (backends/contract.py, RowBackend.rows): per-row loss [C] (compute dtype)
    of raw logit rows [C, V]; writes row_scale * dloss/ds_raw into grad_out (any float dtype, may
    alias s_raw) and the row statistics into stats_out when given. Masked rows give exactly 0.

    Over one shard of a vocabulary split between processes (pmi_kernels/vocab_parallel.py), the
    row operation runs in three phases, each given what the previous ones gathered: Phase.LSE
    writes into lse_out [C, 4] this shard's (max, sum of exp) of s and of the target g; from
    lse_in [C, 4] = the whole vocabulary's (max, log sum of exp) of s and g, Phase.FROM_LSE gives
    the loss, statistics and slope_sum_out [C] as this shard's partial sums (and writes the
    gradient of forward KL); Phase.GRAD, from slope_sum_in [C] too, writes only the gradient."""
    phase = check_phase_tensors(
        phase, lse_out=lse_out, lse_in=lse_in, slope_sum_out=slope_sum_out, slope_sum_in=slope_sum_in
    )
    dtype = compute_dtype(s_raw.dtype)
    inv_tau = 1.0 / opts.temperature
    s, t, r, a = (_scaled(x, dtype, inv_tau) for x in (s_raw, t_raw, r_raw, a_raw))
    g = target_logits(s, t, r, a, kappa, opts)

    def keep(x: torch.Tensor) -> torch.Tensor:
        return x if mask is None else torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, 0.0)

    zero_loss = torch.zeros(s.shape[0], dtype=dtype, device=s.device)
    if phase == Phase.LSE:
        lse_out.copy_(torch.cat([local_lse(s), local_lse(g)], -1))
        if mask is not None:
            lse_out[~mask] = torch.tensor(
                [float("-inf"), 0.0, float("-inf"), 0.0], dtype=lse_out.dtype, device=lse_out.device
            )
        return zero_loss
    if phase == Phase.ALL:
        lp, lq = log_softmax(s), log_softmax(g)
    else:
        lse_in = lse_in.to(dtype)
        lp = (s - lse_in[:, 0:1]) - lse_in[:, 1:2]
        lq = (g - lse_in[:, 2:3]) - lse_in[:, 3:4]
    summand, slope = summand_and_slope(lp, lq, opts, slope=grad_out is not None or slope_sum_out is not None)
    if opts.entry_clip is not None:
        if slope is not None:
            slope = slope.masked_fill(summand > opts.entry_clip, 0.0)
        summand = summand.clamp(max=opts.entry_clip)
    grad_only = phase == Phase.GRAD
    loss = zero_loss if grad_only else keep(summand.sum(-1))
    if stats_out is not None and not grad_only:
        stats_out.copy_(keep(row_stats(lp, lq)))
    if slope_sum_out is not None:
        slope_sum_out.copy_(keep(slope.sum(-1)))
    # Within the phases, only forward KL's gradient is written before the slopes are summed.
    if grad_out is None or (phase == Phase.FROM_LSE and not opts.fast_grad):
        return loss
    if opts.fast_grad:
        grad = lp.exp() - lq.exp()
    else:
        slope_sum = slope.sum(-1, keepdim=True) if slope_sum_in is None else slope_sum_in.to(dtype)[:, None]
        grad = slope - lp.exp() * slope_sum
    grad = grad * inv_tau if row_scale is None else grad * (row_scale.to(dtype)[:, None] * inv_tau)
    grad_out.copy_(keep(grad))
    return loss
