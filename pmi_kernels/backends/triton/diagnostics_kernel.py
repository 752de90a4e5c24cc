"""Triton kernel for pmi_diagnostics: the decomposition of the teacher's signal, per row.

Two passes over a row:

    1. online lse of s, t, r; the entropy terms of p; Σ(t - r)                   reads s, t, r
    2. with the log-sum-exps known: the dot products of Δ_total = log p_T - log p_S,
       Δ_ref = log p_R - log p_S and Δ_it = log p_T - log p_R (each formed as the loss forms
       log p_T - log p_R, _log_ratio) and KL(p_T || p_S), each summed from its own entries
       (expanded from raw sums they cancel: a dot product when Δ_it is small next to Δ_total,
       E_pT[t - s] - (lse t - lse s) when t stands far from s); the target g (needs the
       centering mean of pass 1): its online lse, E_q[s - max s] and the entropy terms of q,
       so KL(q || p) = E_q[lq] - E_q[log p] without a third pass
                                                                                  reads s, t, r, a
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...options import LossOptions
from .. import DIAGNOSTICS
from .row_kernel import NUM_WARPS, block_v, load_tile, tanh


@triton.jit
def _online(m_run, z_run, y_run, b_x, m_v):
    """Running (max m, z = Σ e^(x-m), y = Σ e^(x-m)(x-m)) over a tile: entropy = log z - y/z."""
    m_new = tl.maximum(m_run, tl.max(tl.where(m_v, b_x, float("-inf")), axis=0))
    alpha = tl.exp(m_run - m_new)
    e = tl.where(m_v, tl.exp(b_x - m_new), 0.0)
    # (m_run - m_new) * z_run is -inf * 0 before the first tile: no mass yet, no shift.
    shift = tl.where(z_run > 0, (m_run - m_new) * z_run, 0.0)
    y_new = alpha * (y_run + shift) + tl.sum(e * (b_x - m_new), axis=0)
    return m_new, alpha * z_run + tl.sum(e, axis=0), y_new, alpha, e


@triton.jit
def _log_ratio(b_x, b_y, max_diff, log_z_diff, ACC: tl.constexpr):
    """log p_X - log p_Y = (x - y) - (max x - max y) - (log z_x - log z_y), as the loss forms
    log p_T - log p_R (row_kernel._target_tile): the first two terms in float64, where differences
    of float32 numbers are exact; (x - max x - log z_x) - (y - max y - log z_y) cancels to the
    logits' ulp where the streams share a confident token at |x| ~ 1e5."""
    return ((b_x.to(tl.float64) - b_y.to(tl.float64)) - max_diff).to(ACC) - log_z_diff


@triton.jit
def pmi_diagnostics_kernel(
    p_s,
    p_t,
    p_r,
    p_a,
    p_out,
    p_params,
    stride_s,
    stride_t,
    stride_r,
    stride_a,
    V,
    HAS_A: tl.constexpr,
    CLIP: tl.constexpr,
    CENTER: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_tau = tl.load(p_params + 0)
    inv_beta = tl.load(p_params + 1)
    clip = tl.load(p_params + 2)
    inv_clip = tl.load(p_params + 3)
    # The smallest normal number of the compute dtype: what a zero norm is clamped to, as the
    # other backends and the reference clamp it.
    tiny = tl.load(p_params + 4)
    p_s += row * stride_s
    p_t += row * stride_t
    p_r += row * stride_r
    if HAS_A:
        p_a += row * stride_a
    o_base = tl.arange(0, BLOCK_V)

    # Pass 1: the log-sum-exps, H(p) and Σ(t - r).
    zero = tl.zeros([], dtype=ACC)
    m_s, z_s, y_s = zero - float("inf"), zero, zero
    m_t, z_t, y_t = zero - float("inf"), zero, zero
    m_r, z_r, y_r = zero - float("inf"), zero, zero
    b_tr = tl.zeros([BLOCK_V], dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + o_base
        m_v = o_v < V
        b_s = load_tile(p_s, o_v, m_v, inv_tau, ACC)
        b_t = load_tile(p_t, o_v, m_v, inv_tau, ACC)
        b_r = load_tile(p_r, o_v, m_v, inv_tau, ACC)
        m_s, z_s, y_s, _, _ = _online(m_s, z_s, y_s, b_s, m_v)
        m_t, z_t, y_t, _, _ = _online(m_t, z_t, y_t, b_t, m_v)
        m_r, z_r, y_r, _, _ = _online(m_r, z_r, y_r, b_r, m_v)
        b_tr += tl.where(m_v, b_t - b_r, 0.0)
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    log_z_r = tl.log(z_r)

    # Pass 2: the dot products, and the target: Δ = t - r less the centering mean, or log p_T - log p_R
    # summed as row_kernel._target_tile sums it (t - r less the maxima's difference, in float64).
    max_ts = m_t.to(tl.float64) - m_s.to(tl.float64)
    max_rs = m_r.to(tl.float64) - m_s.to(tl.float64)
    max_diff = m_t.to(tl.float64) - m_r.to(tl.float64)
    if CENTER:
        kappa = tl.sum(b_tr, axis=0) / V
    else:
        kappa = log_z_t - log_z_r
    b_tt = tl.zeros([BLOCK_V], dtype=ACC)
    b_rr = tl.zeros([BLOCK_V], dtype=ACC)
    b_trr = tl.zeros([BLOCK_V], dtype=ACC)
    b_ii = tl.zeros([BLOCK_V], dtype=ACC)
    b_ti = tl.zeros([BLOCK_V], dtype=ACC)
    b_kl_ts = tl.zeros([BLOCK_V], dtype=ACC)
    m_g, z_g, y_g = zero - float("inf"), zero, zero
    e_qs = zero  # Σ e^(g - m_g) (s - m_s), rescaled with z_g
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + o_base
        m_v = o_v < V
        b_s = load_tile(p_s, o_v, m_v, inv_tau, ACC)
        b_t = load_tile(p_t, o_v, m_v, inv_tau, ACC)
        b_r = load_tile(p_r, o_v, m_v, inv_tau, ACC)
        # log p = (x - max) - log z, never x - (max + log z), which rounds log z away at |x| ~ 1e4.
        lt = (b_t - m_t) - log_z_t
        total = tl.where(m_v, _log_ratio(b_t, b_s, max_ts, log_z_t - log_z_s, ACC), 0.0)
        ref = tl.where(m_v, _log_ratio(b_r, b_s, max_rs, log_z_r - log_z_s, ACC), 0.0)
        pmi = tl.where(m_v, _log_ratio(b_t, b_r, max_diff, log_z_t - log_z_r, ACC), 0.0)
        b_kl_ts += tl.where(m_v, tl.exp(lt), 0.0) * total
        b_tt += total * total
        b_rr += ref * ref
        b_trr += total * ref
        b_ii += pmi * pmi
        b_ti += total * pmi
        if CENTER:
            b_d = b_t - b_r
        else:
            b_d = ((b_t.to(tl.float64) - b_r.to(tl.float64)) - max_diff).to(ACC)
        if CLIP:
            b_d = clip * tanh((b_d - kappa) * inv_clip)
        if HAS_A:
            b_g = load_tile(p_a, o_v, m_v, inv_tau, ACC) + b_d * inv_beta
        else:
            b_g = b_s + b_d * inv_beta
        m_g, z_g, y_g, alpha, e = _online(m_g, z_g, y_g, b_g, m_v)
        e_qs = alpha * e_qs + tl.sum(e * tl.where(m_v, b_s - m_s, 0.0), axis=0)
    log_z_g = tl.log(z_g)
    norm_t = tl.sqrt(tl.sum(b_tt, axis=0))
    norm_r = tl.sqrt(tl.sum(b_rr, axis=0))
    norm_i = tl.sqrt(tl.sum(b_ii, axis=0))

    p_out += row * 7
    tl.store(p_out + 0, tl.sum(b_trr, axis=0) / tl.maximum(norm_t * norm_r, tiny))
    tl.store(p_out + 1, tl.sum(b_ti, axis=0) / tl.maximum(norm_t * norm_i, tiny))
    tl.store(p_out + 2, norm_r / tl.maximum(norm_t, tiny))
    tl.store(p_out + 3, tl.sum(b_kl_ts, axis=0))
    # KL(q || p) = E_q[(g - m_g) - log z_g] - E_q[(s - m_s) - log z_s], with y_g = Σ e^(g - m_g)(g - m_g).
    tl.store(p_out + 4, (y_g - e_qs) / z_g - (log_z_g - log_z_s))
    tl.store(p_out + 5, log_z_s - y_s / z_s)
    tl.store(p_out + 6, log_z_g - y_g / z_g)


@functools.lru_cache(maxsize=64)
def _params(opts: LossOptions, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's scalars: four of LossOptions.kernel_scalars, and the compute dtype's smallest
    normal number."""
    k = opts.kernel_scalars()
    return torch.tensor(
        [k.inv_tau, k.inv_beta, k.clip, k.inv_clip, torch.finfo(dtype).tiny], dtype=dtype, device=device
    )


def diagnostics_rows(s_raw, t_raw, r_raw, a_raw=None, *, opts: LossOptions, block=None) -> torch.Tensor:
    """[C, 7] diagnostics (backends.DIAGNOSTICS order) of logit rows [C, V], unit stride along V.
    `block` overrides the tile width (tests pass narrow tiles to cross several)."""
    n_rows, vocab = s_raw.shape
    acc = tl.float64 if s_raw.dtype == torch.float64 else tl.float32
    out = torch.empty(
        n_rows, len(DIAGNOSTICS), dtype=torch.float64 if acc == tl.float64 else torch.float32, device=s_raw.device
    )
    if n_rows == 0:
        return out
    pmi_diagnostics_kernel[(n_rows,)](
        p_s=s_raw,
        p_t=t_raw,
        p_r=r_raw,
        p_a=a_raw,
        p_out=out,
        p_params=_params(opts, out.dtype, s_raw.device),
        stride_s=s_raw.stride(0),
        stride_t=t_raw.stride(0),
        stride_r=r_raw.stride(0),
        stride_a=0 if a_raw is None else a_raw.stride(0),
        V=vocab,
        HAS_A=a_raw is not None,
        CLIP=opts.clip is not None,
        CENTER=opts.center,
        ACC=acc,
        BLOCK_V=block_v(vocab, s_raw.device.type == "cpu", block),
        num_warps=NUM_WARPS,
    )
    return out
