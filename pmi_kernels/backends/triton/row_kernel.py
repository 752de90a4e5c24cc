"""Triton row kernel: logit rows of the student, target and frozen streams -> loss and dloss/ds.

One program per row streams the vocabulary in BLOCK_V tiles, in the inputs' dtype,
with fp32 (fp64 for fp64 inputs) statistics in registers. Passes over a row:

    0. only when kappa is not given and the soft clip needs it: mean(t - r), or
       lse(t) - lse(r) with centering off                     reads t, r
    1. online log-sum-exp of s and of the target g            reads s, t, r, a
    2. loss summands, sum_v A_v and the row statistics;
       forward KL writes p - q                                reads s, t, r, a (+ writes grad)
    3. other losses: grad = A - p * sum A                     reads s, t, r, a, writes grad

The headline fused path (PMI, forward KL, t - r from one GEMM, kappa from the GEMM) reads
its two bf16 streams twice and writes the gradient once: 10 bytes per vocabulary entry.
The gradient may alias the student logits: every pass reads a tile before it is written.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ...options import FORWARD_KL, MIXED_JSD, REVERSE_KL, LossOptions, compute_dtype
from ..contract import Phase, check_phase_tensors

# kappa (the per-row shift of t - r under the clip): where it comes from.
KAPPA_NONE: tl.constexpr = tl.constexpr(0)
KAPPA_GIVEN: tl.constexpr = tl.constexpr(1)  # computed by the caller (the fused path's GEMM)
KAPPA_MEAN: tl.constexpr = tl.constexpr(2)  # mean(t - r): centering on
KAPPA_LSE_DIFF: tl.constexpr = tl.constexpr(3)  # lse(t) - lse(r): centering off (_target_tile)
# Which passes run, as backends.contract.Phase numbers them (pmi_kernels/vocab_parallel.py runs
# the last three, gathering between them): all; pass 1 only, writing this shard's log-sum-exps;
# pass 2 from the gathered log-sum-exps, writing the partial slope sum; pass 3 only, from the
# gathered slope sum.
PHASE_ALL: tl.constexpr = tl.constexpr(Phase.ALL.value)
PHASE_LSE: tl.constexpr = tl.constexpr(Phase.LSE.value)
PHASE_FROM_LSE: tl.constexpr = tl.constexpr(Phase.FROM_LSE.value)
PHASE_GRAD: tl.constexpr = tl.constexpr(Phase.GRAD.value)
# The kernel's LOSS_KIND branches, named as options.py numbers the losses.
LOSS_FORWARD_KL: tl.constexpr = tl.constexpr(FORWARD_KL)
LOSS_REVERSE_KL: tl.constexpr = tl.constexpr(REVERSE_KL)
# Tiles under the interpreter run as one numpy op each, so wide tiles are fast there; tests
# pass narrower ones to cross tiles. On an H200 (2026-11-26) 2048-wide tiles over 8 warps ran
# the fused path's shape fastest (1.16 ms vs 1.22 for 4096x8, 1.60 for 8192x32), no spills.
GPU_BLOCK_V, INTERPRETER_BLOCK_V, NUM_WARPS = 2048, 8192, 8


@triton.jit
def tanh(x):
    """Through exp(-2|x|), which never overflows (libdevice tanh is not in the interpreter); below
    |x| = 1/8, where 1 - exp(-2|x|) would cancel (a large clip makes every x small), the odd
    Taylor series to x^11 (relative error under 1e-11)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    x2 = x * x
    series = (
        (((-1382.0 / 155925.0 * x2 + 62.0 / 2835.0) * x2 - 17.0 / 315.0) * x2 + 2.0 / 15.0) * x2 - 1.0 / 3.0
    ) * x2 + 1.0
    th = tl.where(ax < 0.125, ax * series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -th, th)


@triton.jit
def load_tile(p_row, o_v, m_v, scale, ACC: tl.constexpr):
    return tl.load(p_row + o_v, mask=m_v, other=0.0).to(ACC) * scale


@triton.jit
def _target_tile(
    b_s,
    p_t,
    p_r,
    p_a,
    o_v,
    m_v,
    inv_tau,
    kappa,
    max_diff,
    clip,
    inv_clip,
    inv_beta,
    PMI: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_A: tl.constexpr,
    CLIP: tl.constexpr,
    LOG_RATIO: tl.constexpr,
    ACC: tl.constexpr,
):
    """Target logits g for one tile, from the scaled student tile and the frozen streams.
    LOG_RATIO (centering off, the clip on): Δ = log p_T - log p_R = ((t - r) - max_diff) - kappa,
    max_diff = max t - max r and kappa = log z_t - log z_r; t - r less max_diff is summed in
    float64, where both differences of float32 numbers are exact: in the compute dtype they
    would cancel to the logits' ulp where |x| ~ 1e5 (one stream's logit far above the other's,
    or both far above the rest)."""
    b_t = load_tile(p_t, o_v, m_v, inv_tau, ACC)
    if not PMI:
        return b_t
    if LOG_RATIO:
        b_r = load_tile(p_r, o_v, m_v, inv_tau, ACC)
        b_t = ((b_t.to(tl.float64) - b_r.to(tl.float64)) - max_diff).to(ACC)
    elif HAS_R:
        b_t -= load_tile(p_r, o_v, m_v, inv_tau, ACC)
    if CLIP:
        b_t = clip * tanh((b_t - kappa) * inv_clip)
    if HAS_A:
        return load_tile(p_a, o_v, m_v, inv_tau, ACC) + b_t * inv_beta
    return b_s + b_t * inv_beta


@triton.jit
def _online_lse(m_run, z_run, b_x):
    """One tile into a running (max, sum of exp(x - max)); the tile has a finite entry."""
    m_new = tl.maximum(m_run, tl.max(b_x, axis=0))
    return m_new, z_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(b_x - m_new), axis=0)


@triton.jit
def _summand_and_slope(lp, lq, lam, log_1m_lam, log_lam, entry_clip, LOSS_KIND: tl.constexpr, ENTRY_CLIP: tl.constexpr):
    """Loss summand per entry and its derivative in log p (zero where entry_clip clamps)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if LOSS_KIND == LOSS_FORWARD_KL:
        f = q * (lq - lp)
        slope = -q
    elif LOSS_KIND == LOSS_REVERSE_KL:
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
def _tile_terms(
    p_s,
    p_t,
    p_r,
    p_a,
    o_v,
    m_v,
    inv_tau,
    kappa,
    max_diff,
    clip,
    inv_clip,
    inv_beta,
    m_s,
    log_z_s,
    m_g,
    log_z_g,
    lam,
    log_1m_lam,
    log_lam,
    entry_clip,
    PMI: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_A: tl.constexpr,
    CLIP: tl.constexpr,
    KAPPA: tl.constexpr,
    LOSS_KIND: tl.constexpr,
    ENTRY_CLIP: tl.constexpr,
    ACC: tl.constexpr,
):
    """(summand, slope, p, q, log p, log q) of one tile, once both log-sum-exps are known.
    log p = (s - max) - log z, never s - (max + log z): the latter rounds log z away at
    |s| ~ 1e4, where an fp32 ulp of the max is larger than a runner-up's share of the mass."""
    b_s = load_tile(p_s, o_v, m_v, inv_tau, ACC)
    b_g = _target_tile(
        b_s,
        p_t,
        p_r,
        p_a,
        o_v,
        m_v,
        inv_tau,
        kappa,
        max_diff,
        clip,
        inv_clip,
        inv_beta,
        PMI,
        HAS_R,
        HAS_A,
        CLIP,
        KAPPA == KAPPA_LSE_DIFF,
        ACC,
    )
    lp = (b_s - m_s) - log_z_s
    lq = (b_g - m_g) - log_z_g
    f, slope, p, q = _summand_and_slope(lp, lq, lam, log_1m_lam, log_lam, entry_clip, LOSS_KIND, ENTRY_CLIP)
    return f, slope, p, q, lp, lq


@triton.jit
def pmi_kl_fwd_kernel(
    p_s,
    p_t,
    p_r,
    p_a,
    p_kappa,
    p_mask,
    p_row_scale,
    p_loss,
    p_grad,
    p_stats,
    p_params,
    p_lse_in,
    p_lse_out,
    p_slope_in,
    p_slope_out,
    stride_s,
    stride_t,
    stride_r,
    stride_a,
    stride_grad,
    stride_row_scale,
    V,
    PMI: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_A: tl.constexpr,
    CLIP: tl.constexpr,
    KAPPA: tl.constexpr,
    LOSS_KIND: tl.constexpr,
    ENTRY_CLIP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    FAST_GRAD: tl.constexpr,
    PHASE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
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
    if HAS_R:
        p_r += row * stride_r
    if HAS_A:
        p_a += row * stride_a
    if WRITE_GRAD:
        p_grad += row * stride_grad
    o_base = tl.arange(0, BLOCK_V)
    # A masked-out row runs no pass: v_end = 0, and its gradient row is zeroed below.
    v_end = V
    if HAS_MASK:
        v_end = tl.where(tl.load(p_mask + row) != 0, V, 0)

    kappa = 0.0
    max_diff = tl.zeros([], dtype=tl.float64)  # used with KAPPA_LSE_DIFF only (_target_tile)
    if KAPPA == KAPPA_GIVEN:
        kappa = tl.load(p_kappa + row).to(ACC)
    elif KAPPA == KAPPA_MEAN:
        b_sum = tl.zeros([BLOCK_V], dtype=ACC)
        for v0 in range(0, v_end, BLOCK_V):
            o_v = v0 + o_base
            m_v = o_v < V
            b_x = load_tile(p_t, o_v, m_v, inv_tau, ACC)
            if HAS_R:
                b_x -= load_tile(p_r, o_v, m_v, inv_tau, ACC)
            b_sum += b_x
        kappa = tl.sum(b_sum, axis=0) / V
    elif KAPPA == KAPPA_LSE_DIFF:
        m_t = tl.full([], float("-inf"), ACC)
        z_t = tl.zeros([], dtype=ACC)
        m_r = tl.full([], float("-inf"), ACC)
        z_r = tl.zeros([], dtype=ACC)
        for v0 in range(0, v_end, BLOCK_V):
            o_v = v0 + o_base
            m_v = o_v < V
            m_t, z_t = _online_lse(m_t, z_t, tl.where(m_v, load_tile(p_t, o_v, m_v, inv_tau, ACC), float("-inf")))
            m_r, z_r = _online_lse(m_r, z_r, tl.where(m_v, load_tile(p_r, o_v, m_v, inv_tau, ACC), float("-inf")))
        max_diff = m_t.to(tl.float64) - m_r.to(tl.float64)
        kappa = tl.log(z_t) - tl.log(z_r)

    if PHASE == PHASE_ALL or PHASE == PHASE_LSE:
        # Pass 1: log-sum-exp of the student and of the target.
        m_s = tl.full([], float("-inf"), ACC)
        z_s = tl.zeros([], dtype=ACC)
        m_g = tl.full([], float("-inf"), ACC)
        z_g = tl.zeros([], dtype=ACC)
        for v0 in range(0, v_end, BLOCK_V):
            o_v = v0 + o_base
            m_v = o_v < V
            b_s = load_tile(p_s, o_v, m_v, inv_tau, ACC)
            b_g = _target_tile(
                b_s,
                p_t,
                p_r,
                p_a,
                o_v,
                m_v,
                inv_tau,
                kappa,
                max_diff,
                clip,
                inv_clip,
                inv_beta,
                PMI,
                HAS_R,
                HAS_A,
                CLIP,
                KAPPA == KAPPA_LSE_DIFF,
                ACC,
            )
            m_s, z_s = _online_lse(m_s, z_s, tl.where(m_v, b_s, float("-inf")))
            m_g, z_g = _online_lse(m_g, z_g, tl.where(m_v, b_g, float("-inf")))
        log_z_s = tl.log(z_s)
        log_z_g = tl.log(z_g)
    else:
        # The whole vocabulary's (max, log sum of exp), gathered from every shard.
        m_s = tl.load(p_lse_in + row * 4 + 0).to(ACC)
        log_z_s = tl.load(p_lse_in + row * 4 + 1).to(ACC)
        m_g = tl.load(p_lse_in + row * 4 + 2).to(ACC)
        log_z_g = tl.load(p_lse_in + row * 4 + 3).to(ACC)

    if PHASE == PHASE_LSE:
        # This shard's (max, sum of exp) of s and g; a masked row has no mass: (-inf, 0).
        tl.store(p_lse_out + row * 4 + 0, m_s)
        tl.store(p_lse_out + row * 4 + 1, z_s)
        tl.store(p_lse_out + row * 4 + 2, m_g)
        tl.store(p_lse_out + row * 4 + 3, z_g)
        tl.store(p_loss + row, 0.0)
    else:
        grad_scale = inv_tau
        if HAS_ROW_SCALE:
            grad_scale = grad_scale * tl.load(p_row_scale + row * stride_row_scale).to(ACC)
        kept = v_end > 0
        if PHASE == PHASE_GRAD:
            slope_sum = tl.load(p_slope_in + row).to(ACC)
        else:
            # Pass 2: the loss, sum_v A_v and the row statistics.
            b_loss = tl.zeros([BLOCK_V], dtype=ACC)
            b_slope_sum = tl.zeros([BLOCK_V], dtype=ACC)
            b_kl = tl.zeros([BLOCK_V], dtype=ACC)
            b_ent_p = tl.zeros([BLOCK_V], dtype=ACC)
            b_ent_q = tl.zeros([BLOCK_V], dtype=ACC)
            for v0 in range(0, v_end, BLOCK_V):
                o_v = v0 + o_base
                m_v = o_v < V
                f, slope, p, q, lp, lq = _tile_terms(
                    p_s,
                    p_t,
                    p_r,
                    p_a,
                    o_v,
                    m_v,
                    inv_tau,
                    kappa,
                    max_diff,
                    clip,
                    inv_clip,
                    inv_beta,
                    m_s,
                    log_z_s,
                    m_g,
                    log_z_g,
                    lam,
                    log_1m_lam,
                    log_lam,
                    entry_clip,
                    PMI,
                    HAS_R,
                    HAS_A,
                    CLIP,
                    KAPPA,
                    LOSS_KIND,
                    ENTRY_CLIP,
                    ACC,
                )
                b_loss += tl.where(m_v, f, 0.0)
                b_slope_sum += tl.where(m_v, slope, 0.0)
                if WRITE_STATS:
                    b_kl += tl.where(m_v, q * (lq - lp), 0.0)
                    b_ent_p -= tl.where(m_v, p * lp, 0.0)
                    b_ent_q -= tl.where(m_v, q * lq, 0.0)
                if FAST_GRAD:
                    tl.store(p_grad + o_v, ((p - q) * grad_scale).to(p_grad.dtype.element_ty), mask=m_v)
            slope_sum = tl.sum(b_slope_sum, axis=0)
            tl.store(p_loss + row, tl.where(kept, tl.sum(b_loss, axis=0), 0.0))
            if WRITE_STATS:
                tl.store(p_stats + row * 3 + 0, tl.where(kept, tl.sum(b_kl, axis=0), 0.0))
                tl.store(p_stats + row * 3 + 1, tl.where(kept, tl.sum(b_ent_p, axis=0), 0.0))
                tl.store(p_stats + row * 3 + 2, tl.where(kept, tl.sum(b_ent_q, axis=0), 0.0))
            if PHASE == PHASE_FROM_LSE:
                tl.store(p_slope_out + row, tl.where(kept, slope_sum, 0.0))
        # Pass 3: grad = A - p * sum A, for the losses whose gradient needs that row sum.
        if WRITE_GRAD and not FAST_GRAD:
            for v0 in range(0, v_end, BLOCK_V):
                o_v = v0 + o_base
                m_v = o_v < V
                f, slope, p, q, lp, lq = _tile_terms(
                    p_s,
                    p_t,
                    p_r,
                    p_a,
                    o_v,
                    m_v,
                    inv_tau,
                    kappa,
                    max_diff,
                    clip,
                    inv_clip,
                    inv_beta,
                    m_s,
                    log_z_s,
                    m_g,
                    log_z_g,
                    lam,
                    log_1m_lam,
                    log_lam,
                    entry_clip,
                    PMI,
                    HAS_R,
                    HAS_A,
                    CLIP,
                    KAPPA,
                    LOSS_KIND,
                    ENTRY_CLIP,
                    ACC,
                )
                tl.store(p_grad + o_v, ((slope - p * slope_sum) * grad_scale).to(p_grad.dtype.element_ty), mask=m_v)
        if WRITE_GRAD and HAS_MASK:
            for v0 in range(0, V - v_end, BLOCK_V):
                o_v = v0 + o_base
                tl.store(p_grad + o_v, tl.zeros([BLOCK_V], dtype=p_grad.dtype.element_ty), mask=o_v < V)
        if PHASE == PHASE_GRAD:
            tl.store(p_loss + row, 0.0)


def block_v(vocab: int, interpret: bool, block: Optional[int] = None) -> int:
    """The tile width: `block` when given (tests pass narrow tiles to cross several), else the
    device's default, never wider than the vocabulary needs."""
    widest = block or (INTERPRETER_BLOCK_V if interpret else GPU_BLOCK_V)
    return min(triton.next_power_of_2(vocab), widest)


@functools.lru_cache(maxsize=64)
def _params(opts: LossOptions, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernel's scalars (LossOptions.kernel_scalars, in its order), one small cached tensor per
    option set (no copy per launch)."""
    return torch.tensor(list(opts.kernel_scalars()), dtype=dtype, device=device)


def kappa_source(opts: LossOptions, kappa_given: bool) -> int:
    if not opts.needs_kappa:
        return KAPPA_NONE.value
    if kappa_given:
        return KAPPA_GIVEN.value
    return (KAPPA_MEAN if opts.center else KAPPA_LSE_DIFF).value


def _row_stride(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.stride(0)


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
    block: Optional[int] = None,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """The row operation (backends/contract.py, RowBackend.rows; phases included) on [C, V] rows
    with unit stride along V. `block` and `num_warps` override the launch configuration (tests,
    tuning)."""
    phase = check_phase_tensors(
        phase, lse_out=lse_out, lse_in=lse_in, slope_sum_out=slope_sum_out, slope_sum_in=slope_sum_in
    )
    n_rows, vocab = s_raw.shape
    loss = torch.empty(n_rows, dtype=compute_dtype(s_raw.dtype), device=s_raw.device)
    if n_rows == 0:
        return loss
    for x in (s_raw, t_raw, r_raw, a_raw, grad_out):
        assert x is None or vocab == 1 or x.stride(-1) == 1, "rows must be contiguous along the vocabulary"
    for x in (stats_out, lse_out, lse_in, slope_sum_out, slope_sum_in):
        assert x is None or x.is_contiguous(), "per-row outputs and inputs must be contiguous"
    # Within the phases, only forward KL's gradient is written before the slopes are summed.
    if phase == Phase.LSE or (phase == Phase.FROM_LSE and not opts.fast_grad):
        grad_out = None
    write_stats = stats_out is not None and phase in (Phase.ALL, Phase.FROM_LSE)
    acc = tl.float64 if loss.dtype == torch.float64 else tl.float32
    pmi_kl_fwd_kernel[(n_rows,)](
        p_s=s_raw,
        p_t=t_raw,
        p_r=r_raw,
        p_a=a_raw,
        p_kappa=kappa,
        p_mask=mask,
        p_row_scale=row_scale,
        p_loss=loss,
        p_grad=grad_out,
        p_stats=stats_out if write_stats else None,
        p_params=_params(opts, loss.dtype, s_raw.device),
        p_lse_in=lse_in,
        p_lse_out=lse_out,
        p_slope_in=slope_sum_in,
        p_slope_out=slope_sum_out,
        stride_s=s_raw.stride(0),
        stride_t=t_raw.stride(0),
        stride_r=_row_stride(r_raw),
        stride_a=_row_stride(a_raw),
        stride_grad=_row_stride(grad_out),
        stride_row_scale=_row_stride(row_scale),
        V=vocab,
        PMI=opts.pmi,
        HAS_R=r_raw is not None,
        HAS_A=a_raw is not None,
        CLIP=opts.needs_kappa,
        KAPPA=kappa_source(opts, kappa is not None),
        LOSS_KIND=opts.loss_kind,
        ENTRY_CLIP=opts.entry_clip is not None,
        HAS_MASK=mask is not None,
        HAS_ROW_SCALE=row_scale is not None,
        WRITE_GRAD=grad_out is not None,
        WRITE_STATS=write_stats,
        FAST_GRAD=grad_out is not None and opts.fast_grad,
        PHASE=phase.value,
        ACC=acc,
        BLOCK_V=block_v(vocab, s_raw.device.type == "cpu", block),
        num_warps=num_warps,
    )
    return loss


# The kernel branches on LOSS_KIND == LOSS_FORWARD_KL, LOSS_REVERSE_KL, else mixed.
assert MIXED_JSD not in (FORWARD_KL, REVERSE_KL)
