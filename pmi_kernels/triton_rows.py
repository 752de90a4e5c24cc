"""Triton row kernel: logit rows of the student, target and frozen streams -> loss and dloss/ds.

One program per row streams the vocabulary in BLOCK_V tiles, in the inputs' dtype,
with fp32 (fp64 for fp64 inputs) statistics in registers. Passes over a row:

    0. only when kappa is not given and the soft clip needs it: mean(t - r), or
       lse(t) - lse(r) with centering off                     reads t, r
    1. online log-sum-exp of s and of the target g            reads s, t, r, a
    2. loss summands and sum_v A_v; forward KL writes p - q   reads s, t, r, a (+ writes grad)
    3. other losses: grad = A - p * sum A                     reads s, t, r, a, writes grad

The headline fused path (PMI, forward KL, t - r from one GEMM, kappa from the GEMM) reads
its two bf16 streams twice and writes the gradient once: 10 bytes per vocabulary entry.
The gradient may alias the student logits: every pass reads a tile before it is written.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .options import FORWARD_KL, MIXED_JSD, REVERSE_KL, LossOptions

# kappa (the per-row shift of t - r under the clip): where it comes from.
KAPPA_NONE, KAPPA_GIVEN, KAPPA_MEAN, KAPPA_LSE_DIFF = 0, 1, 2, 3


@triton.jit
def _tanh(x):
    # exp of a non-positive argument never overflows; libdevice tanh is not in the interpreter.
    e = tl.exp(-2.0 * tl.abs(x))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -th, th)


@triton.jit
def _load_tile(p_row, o_v, m_v, scale, ACC: tl.constexpr):
    return tl.load(p_row + o_v, mask=m_v, other=0.0).to(ACC) * scale


@triton.jit
def _target_tile(b_s, p_t, p_r, p_a, o_v, m_v, inv_tau, kappa, clip, inv_clip, inv_beta,
                 PMI: tl.constexpr, HAS_R: tl.constexpr, HAS_A: tl.constexpr, CLIP: tl.constexpr,
                 ACC: tl.constexpr):
    """Target logits g for one tile, from the scaled student tile and the frozen streams."""
    b_t = _load_tile(p_t, o_v, m_v, inv_tau, ACC)
    if not PMI:
        return b_t
    if HAS_R:
        b_t -= _load_tile(p_r, o_v, m_v, inv_tau, ACC)
    if CLIP:
        b_t = clip * _tanh((b_t - kappa) * inv_clip)
    if HAS_A:
        return _load_tile(p_a, o_v, m_v, inv_tau, ACC) + b_t * inv_beta
    return b_s + b_t * inv_beta


@triton.jit
def _online_lse(m_run, z_run, b_x):
    """One tile into a running (max, sum of exp(x - max)); the tile has a finite entry."""
    m_new = tl.maximum(m_run, tl.max(b_x, axis=0))
    return m_new, z_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(b_x - m_new), axis=0)


@triton.jit
def _summand_and_slope(lp, lq, lam, log_1m_lam, log_lam, entry_clip,
                       LOSS_KIND: tl.constexpr, ENTRY_CLIP: tl.constexpr):
    """Loss summand per entry and its derivative in log p (zero where entry_clip clamps)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if LOSS_KIND == 0:
        f = q * (lq - lp)
        slope = -q
    elif LOSS_KIND == 1:
        f = p * (lp - lq)
        slope = p * (lp - lq + 1.0)
    else:
        x = lp + log_1m_lam
        y = lq + log_lam
        lm = tl.maximum(x, y) + tl.log(1.0 + tl.exp(-tl.abs(x - y)))
        f = lam * q * (lq - lm) + (1.0 - lam) * p * (lp - lm)
        slope = (1.0 - lam) * p * (lp - lm)
    if ENTRY_CLIP:
        slope = tl.where(f > entry_clip, 0.0, slope)
        f = tl.minimum(f, entry_clip)
    return f, slope, p, q


@triton.jit
def _tile_terms(p_s, p_t, p_r, p_a, o_v, m_v, inv_tau, kappa, clip, inv_clip, inv_beta, m_s, log_z_s, m_g, log_z_g,
                lam, log_1m_lam, log_lam, entry_clip, PMI: tl.constexpr, HAS_R: tl.constexpr, HAS_A: tl.constexpr,
                CLIP: tl.constexpr, LOSS_KIND: tl.constexpr, ENTRY_CLIP: tl.constexpr, ACC: tl.constexpr):
    """(summand, slope, p, q) of one tile, once both log-sum-exps are known.
    log p = (s - max) - log z, never s - (max + log z): the latter rounds log z away at
    |s| ~ 1e4, where an fp32 ulp of the max is larger than a runner-up's share of the mass."""
    b_s = _load_tile(p_s, o_v, m_v, inv_tau, ACC)
    b_g = _target_tile(b_s, p_t, p_r, p_a, o_v, m_v, inv_tau, kappa, clip, inv_clip, inv_beta,
                       PMI, HAS_R, HAS_A, CLIP, ACC)
    return _summand_and_slope((b_s - m_s) - log_z_s, (b_g - m_g) - log_z_g, lam, log_1m_lam, log_lam,
                              entry_clip, LOSS_KIND, ENTRY_CLIP)


@triton.jit
def pmi_kl_fwd_kernel(
    p_s, p_t, p_r, p_a, p_kappa, p_mask, p_row_scale, p_loss, p_grad, p_params,
    stride_s, stride_t, stride_r, stride_a, stride_grad, stride_row_scale, V,
    PMI: tl.constexpr, HAS_R: tl.constexpr, HAS_A: tl.constexpr, CLIP: tl.constexpr,
    KAPPA: tl.constexpr, LOSS_KIND: tl.constexpr, ENTRY_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    FAST_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # 64-bit row offsets: N * V passes 2**31 at long rollouts.
    row = tl.program_id(0).to(tl.int64)
    # Scalars come from a tensor in the compute dtype: float arguments would be fp32.
    inv_tau = tl.load(p_params + 0)
    inv_beta = tl.load(p_params + 1)
    clip = tl.load(p_params + 2)
    inv_clip = tl.load(p_params + 3)
    lam = tl.load(p_params + 4)
    log_1m_lam = tl.load(p_params + 5)
    log_lam = tl.load(p_params + 6)
    entry_clip = tl.load(p_params + 7)
    p_s += row * stride_s
    p_t += row * stride_t
    p_r += row * stride_r
    p_a += row * stride_a
    p_grad += row * stride_grad
    o_base = tl.arange(0, BLOCK_V)
    # A masked-out row runs no pass: v_end = 0, and its gradient row is zeroed below.
    v_end = V
    if HAS_MASK:
        v_end = tl.where(tl.load(p_mask + row) != 0, V, 0)

    kappa = 0.0
    if KAPPA == 1:
        kappa = tl.load(p_kappa + row).to(ACC)
    elif KAPPA == 2:
        b_sum = tl.zeros([BLOCK_V], dtype=ACC)
        for v0 in range(0, v_end, BLOCK_V):
            o_v = v0 + o_base
            m_v = o_v < V
            b_x = _load_tile(p_t, o_v, m_v, inv_tau, ACC)
            if HAS_R:
                b_x -= _load_tile(p_r, o_v, m_v, inv_tau, ACC)
            b_sum += b_x
        kappa = tl.sum(b_sum, axis=0) / V
    elif KAPPA == 3:
        m_t = tl.full([], float("-inf"), ACC)
        z_t = tl.zeros([], dtype=ACC)
        m_r = tl.full([], float("-inf"), ACC)
        z_r = tl.zeros([], dtype=ACC)
        for v0 in range(0, v_end, BLOCK_V):
            o_v = v0 + o_base
            m_v = o_v < V
            m_t, z_t = _online_lse(m_t, z_t, tl.where(m_v, _load_tile(p_t, o_v, m_v, inv_tau, ACC), float("-inf")))
            m_r, z_r = _online_lse(m_r, z_r, tl.where(m_v, _load_tile(p_r, o_v, m_v, inv_tau, ACC), float("-inf")))
        kappa = (m_t - m_r) + (tl.log(z_t) - tl.log(z_r))

    # Pass 1: log-sum-exp of the student and of the target.
    m_s = tl.full([], float("-inf"), ACC)
    z_s = tl.zeros([], dtype=ACC)
    m_g = tl.full([], float("-inf"), ACC)
    z_g = tl.zeros([], dtype=ACC)
    for v0 in range(0, v_end, BLOCK_V):
        o_v = v0 + o_base
        m_v = o_v < V
        b_s = _load_tile(p_s, o_v, m_v, inv_tau, ACC)
        b_g = _target_tile(b_s, p_t, p_r, p_a, o_v, m_v, inv_tau, kappa, clip, inv_clip, inv_beta,
                           PMI, HAS_R, HAS_A, CLIP, ACC)
        m_s, z_s = _online_lse(m_s, z_s, tl.where(m_v, b_s, float("-inf")))
        m_g, z_g = _online_lse(m_g, z_g, tl.where(m_v, b_g, float("-inf")))
    log_z_s = tl.log(z_s)
    log_z_g = tl.log(z_g)

    grad_scale = inv_tau
    if HAS_ROW_SCALE:
        grad_scale = grad_scale * tl.load(p_row_scale + row * stride_row_scale).to(ACC)

    # Pass 2: the loss and sum_v A_v.
    b_loss = tl.zeros([BLOCK_V], dtype=ACC)
    b_slope_sum = tl.zeros([BLOCK_V], dtype=ACC)
    for v0 in range(0, v_end, BLOCK_V):
        o_v = v0 + o_base
        m_v = o_v < V
        f, slope, p, q = _tile_terms(p_s, p_t, p_r, p_a, o_v, m_v, inv_tau, kappa, clip, inv_clip, inv_beta,
                                     m_s, log_z_s, m_g, log_z_g, lam, log_1m_lam, log_lam, entry_clip,
                                     PMI, HAS_R, HAS_A, CLIP, LOSS_KIND, ENTRY_CLIP, ACC)
        b_loss += tl.where(m_v, f, 0.0)
        b_slope_sum += tl.where(m_v, slope, 0.0)
        if FAST_GRAD:
            tl.store(p_grad + o_v, ((p - q) * grad_scale).to(p_grad.dtype.element_ty), mask=m_v)
    loss = tl.sum(b_loss, axis=0)
    slope_sum = tl.sum(b_slope_sum, axis=0)

    # Pass 3: grad = A - p * sum A, for the losses whose gradient needs that row sum.
    if WRITE_GRAD and not FAST_GRAD:
        for v0 in range(0, v_end, BLOCK_V):
            o_v = v0 + o_base
            m_v = o_v < V
            f, slope, p, q = _tile_terms(p_s, p_t, p_r, p_a, o_v, m_v, inv_tau, kappa, clip, inv_clip, inv_beta,
                                         m_s, log_z_s, m_g, log_z_g, lam, log_1m_lam, log_lam, entry_clip,
                                         PMI, HAS_R, HAS_A, CLIP, LOSS_KIND, ENTRY_CLIP, ACC)
            tl.store(p_grad + o_v, ((slope - p * slope_sum) * grad_scale).to(p_grad.dtype.element_ty), mask=m_v)
    if WRITE_GRAD and HAS_MASK:
        for v0 in range(0, V - v_end, BLOCK_V):
            o_v = v0 + o_base
            tl.store(p_grad + o_v, tl.zeros([BLOCK_V], dtype=p_grad.dtype.element_ty), mask=o_v < V)
    tl.store(p_loss + row, tl.where(v_end > 0, loss, 0.0))


def launch_config(vocab: int, interpret: bool):
    """(BLOCK_V, num_warps). The interpreter runs a tile as one numpy op, so big tiles are
    fast there. On an H200 (2026-11-26, benchmarks/results) 2048-wide tiles over 4 or 8
    warps ran the fused path's shape fastest (1.16 ms vs 1.22 for 4096x8, 1.60 for 8192x32),
    with no spills (60 registers)."""
    block = min(triton.next_power_of_2(vocab), 8192 if interpret else 2048)
    return block, 8


@functools.lru_cache(maxsize=64)
def _params(opts: LossOptions, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's scalars, one small cached tensor per option set (no copy per launch)."""
    lam, clip = opts.jsd_beta, opts.clip or 1.0
    values = [1.0 / opts.temperature, 1.0 / opts.beta, clip, 1.0 / clip, lam,
              math.log1p(-lam) if lam < 1 else 0.0, math.log(lam) if lam > 0 else 0.0, opts.entry_clip or 0.0]
    return torch.tensor(values, dtype=dtype, device=device)


def rows_loss_and_grad_triton(s_raw, t_raw, r_raw=None, a_raw=None, *, opts: LossOptions,
                              kappa: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                              row_scale: Optional[torch.Tensor] = None,
                              grad_out: Optional[torch.Tensor] = None, config=None) -> torch.Tensor:
    """Same contract as rows_torch.rows_loss_and_grad, on [C, V] rows with unit stride along V.
    config = (BLOCK_V, num_warps) overrides launch_config (for tuning)."""
    rows, vocab = s_raw.shape
    acc = tl.float64 if s_raw.dtype == torch.float64 else tl.float32
    loss = torch.empty(rows, dtype=torch.float64 if acc == tl.float64 else torch.float32, device=s_raw.device)
    if rows == 0:
        return loss
    for x in (s_raw, t_raw, r_raw, a_raw, grad_out):
        assert x is None or x.stride(-1) == 1, "rows must be contiguous along the vocabulary"
    if not opts.needs_kappa:
        kappa_src = KAPPA_NONE
    elif kappa is not None:
        kappa_src = KAPPA_GIVEN
    else:
        kappa_src = KAPPA_MEAN if opts.center else KAPPA_LSE_DIFF
    params = _params(opts, torch.float64 if acc == tl.float64 else torch.float32, s_raw.device)
    # Absent pointers get the student tensor: a constexpr flag keeps them from being read.
    dummy = s_raw
    interpret = s_raw.device.type == "cpu"
    block, warps = config or launch_config(vocab, interpret)
    pmi_kl_fwd_kernel[(rows,)](
        s_raw, t_raw, dummy if r_raw is None else r_raw, dummy if a_raw is None else a_raw,
        dummy if kappa is None else kappa, dummy if mask is None else mask,
        dummy if row_scale is None else row_scale, loss, dummy if grad_out is None else grad_out, params,
        s_raw.stride(0), t_raw.stride(0), 0 if r_raw is None else r_raw.stride(0),
        0 if a_raw is None else a_raw.stride(0), 0 if grad_out is None else grad_out.stride(0),
        0 if row_scale is None else row_scale.stride(0), vocab,
        PMI=opts.pmi, HAS_R=r_raw is not None, HAS_A=a_raw is not None, CLIP=opts.needs_kappa,
        KAPPA=kappa_src, LOSS_KIND=opts.loss_kind, ENTRY_CLIP=opts.entry_clip is not None,
        HAS_MASK=mask is not None, HAS_ROW_SCALE=row_scale is not None, WRITE_GRAD=grad_out is not None,
        # Forward KL's gradient p - q needs no row sum: it is written in pass 2.
        FAST_GRAD=grad_out is not None and opts.loss_kind == FORWARD_KL and opts.entry_clip is None,
        ACC=acc, BLOCK_V=block, num_warps=warps,
    )
    return loss


# The kernel's LOSS_KIND branches are numbered as options.py numbers the losses.
assert (FORWARD_KL, REVERSE_KL, MIXED_JSD) == (0, 1, 2)
