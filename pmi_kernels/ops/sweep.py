"""The fused path's sweep: hidden states and the lm_head in, the loss and the gradients out,
chunk by chunk, never holding [N, V] logits.

Per chunk of C rows:
    s      = h W^T + b                      GEMM, [C, V] in the input dtype
    t - r  = (h_T - h_R) W_f^T              ONE GEMM for both frozen streams, where SPEC
                                            allows it (the bias and lse(t) - lse(r) cancel),
                                            the input is not fp16, and not bf16 with the
                                            clip off (streams_apart),
    kappa  = (h_T - h_R) . mean_v(W_f) / tau   the centering mean, from the same product
    row op: loss, and dloss/ds written over s in place
    grad_h = dS W,  grad_W += dS^T h,  grad_b += sum dS      (when those gradients are wanted)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import vocab_parallel
from ..backends import REGISTRY, STATS
from ..options import LossOptions, compute_dtype


class FusedInputs(NamedTuple):
    """The tensors of one fused call, rows flattened: the student's hidden states h [N, H] and
    head (w [V, H], b [V]), the frozen streams' hidden states (h_t; h_r and h_a optional) and
    head (w_f, b_f)."""

    h: Tensor
    w: Tensor
    b: Optional[Tensor]
    h_t: Tensor
    h_r: Optional[Tensor]
    h_a: Optional[Tensor]
    w_f: Tensor
    b_f: Optional[Tensor]


class Wanted(NamedTuple):
    """What a sweep computes beside the loss: each gradient, and the row statistics."""

    grad_h: bool = False
    grad_w: bool = False
    grad_b: bool = False
    stats: bool = False


@dataclass(frozen=True)
class SweepPlan:
    """How the rows are swept: the sweep's arguments that are not tensors.

    Args:
        opts: the loss options.
        backend: a name in backends.REGISTRY.
        group: the name of the process group the vocabulary is split over (vocab_parallel.py),
            or None.
        chunk_rows: rows per chunk (ops/planner.py).
        grad_weight_fp32: accumulate the weight gradient over chunks in fp32.
    """

    opts: LossOptions
    backend: str
    group: Optional[str]
    chunk_rows: int
    grad_weight_fp32: bool


def streams_apart(opts: LossOptions, dtype: torch.dtype) -> bool:
    """Whether the teacher's and the reference-only logits take a GEMM each: where lse(t) and
    lse(r) are needed apart; for fp16, where h_T - h_R and t - r can pass its range (6.5e4)
    while each stream stays inside it; and for bf16 with the clip off, where the one product
    rounds h_T - h_R and t - r to bf16 and, with no tanh to bound their effect, those roundings
    moved the loss up to 5x plain torch's bf16 error (docs/loss.md). Otherwise one product of
    h_T - h_R serves both."""
    unclipped_bf16 = dtype == torch.bfloat16 and opts.clip is None
    return opts.separate_lse or dtype == torch.float16 or unclipped_bf16


def logit_buffers(opts: LossOptions, dtype: torch.dtype, anchor_given: bool) -> int:
    """The [C, V] buffers in the input dtype a chunk holds: s, plus each frozen stream computed."""
    apart = opts.pmi and streams_apart(opts, dtype)
    return 1 + (2 if apart else 1) + anchor_given


def _frozen_streams(
    hc_t: Tensor,
    hc_r: Optional[Tensor],
    hc_a: Optional[Tensor],
    w_f: Tensor,
    b_f: Optional[Tensor],
    w_f_mean: Optional[Tensor],
    opts: LossOptions,
) -> tuple:
    """(t, r, a, kappa) for one chunk; t holds t - r where one GEMM serves both streams."""

    def linear(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else F.linear(x, w_f, b_f)

    if not opts.pmi:
        return linear(hc_t), None, None, None
    anchor = linear(hc_a)
    if streams_apart(opts, hc_t.dtype):
        return linear(hc_t), linear(hc_r), anchor, None
    diff = hc_t - hc_r
    kappa = None
    if opts.needs_kappa:
        kappa = (diff.to(w_f_mean.dtype) @ w_f_mean) / opts.temperature
    return F.linear(diff, w_f), None, anchor, kappa


def accumulate_grad_weight(grad_w: Tensor, grad_s: Tensor, h: Tensor, first: bool) -> None:
    """grad_w (+)= grad_s^T h; fp32 accumulation when grad_w is fp32 and the chunk is not.
    The first chunk overwrites, so grad_w needs no zero fill (one pass over [V, H] less)."""
    if grad_w.dtype == grad_s.dtype:
        if first:
            torch.mm(grad_s.t(), h, out=grad_w)
        else:
            grad_w.addmm_(grad_s.t(), h)
    elif grad_w.is_cuda:
        torch.addmm(grad_w, grad_s.t(), h, beta=0 if first else 1, out_dtype=grad_w.dtype, out=grad_w)
    else:
        grad_w.addmm_(grad_s.t().to(grad_w.dtype), h.to(grad_w.dtype), beta=0 if first else 1)


def sweep(
    plan: SweepPlan, inputs: FusedInputs, row_scale: Optional[Tensor], wanted: Wanted
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The chunk loop over the rows of `inputs` (the kept rows only: no mask here).

    Args:
        plan: the options, backend, group, chunk size and weight-gradient dtype.
        inputs: the tensors, n rows.
        row_scale: [n], folded into the gradients (None: 1).
        wanted: the gradients and statistics to compute.
    Returns:
        (loss [n], grad_h [n, H], grad_w [V, H], grad_b [V], stats [n, len(STATS)]), each None
        when not wanted. Over a split vocabulary: the whole vocabulary's loss, this shard's
        weight and bias gradients, and the hidden-state gradient summed over the shards.
    """
    h, w, b, h_t, h_r, h_a, w_f, b_f = inputs
    n, vocab = h.shape[0], w.shape[0]
    rows_fn, group, whole_vocab = REGISTRY[plan.backend].rows, None, vocab
    if plan.group is not None:
        group = vocab_parallel.group_of(plan.group)
        rows_fn = functools.partial(vocab_parallel.parallel_rows, REGISTRY[plan.backend], group=group)
        whole_vocab = vocab_parallel.global_vocab(vocab, group, h.device)
    loss = torch.empty(n, dtype=compute_dtype(h.dtype), device=h.device)
    stats = torch.empty(n, len(STATS), dtype=loss.dtype, device=h.device) if wanted.stats else None
    grad_h = h.new_empty(h.shape) if wanted.grad_h else None  # contiguous, as the fake's (h may be a transposed view)
    grad_w = (
        torch.empty(w.shape, dtype=compute_dtype(w.dtype) if plan.grad_weight_fp32 else w.dtype, device=w.device)
        if wanted.grad_w
        else None
    )
    grad_b = torch.zeros(vocab, dtype=compute_dtype(w.dtype), device=w.device) if wanted.grad_b else None
    want_grad = wanted.grad_h or wanted.grad_w or wanted.grad_b
    # Column mean of W_f over the whole vocabulary, accumulated in fp32 without an fp32 copy.
    w_f_mean = None
    if plan.opts.needs_kappa:
        w_f_sum = torch.sum(w_f, 0, dtype=compute_dtype(w_f.dtype))
        w_f_mean = (w_f_sum if group is None else vocab_parallel.all_reduce(w_f_sum, group)) / whole_vocab
    for i in range(0, n, plan.chunk_rows):
        rows = slice(i, i + plan.chunk_rows)

        def chunk(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x[rows]

        hc = h[rows]
        s = F.linear(hc, w, b)
        t, r, a, kappa = _frozen_streams(
            hc_t=chunk(h_t), hc_r=chunk(h_r), hc_a=chunk(h_a), w_f=w_f, b_f=b_f, w_f_mean=w_f_mean, opts=plan.opts
        )
        if group is not None and r is not None:  # streams apart: kappa over the whole vocabulary
            kappa = vocab_parallel.logits_kappa(t, r, plan.opts, whole_vocab, group)
        loss[rows] = rows_fn(
            s,
            t,
            r,
            a,
            opts=plan.opts,
            kappa=kappa,
            row_scale=chunk(row_scale),
            grad_out=s if want_grad else None,
            stats_out=chunk(stats),
        )
        # s now holds dloss/ds_raw, scaled per row.
        if wanted.grad_h:
            torch.mm(s, w, out=grad_h[rows])
        if wanted.grad_w:
            accumulate_grad_weight(grad_w, s, hc, first=i == 0)
        if wanted.grad_b:
            grad_b += s.sum(0, dtype=grad_b.dtype)
        # Free this chunk's buffers before the next chunk allocates its own.
        del s, t, r, a
    if wanted.grad_w and n == 0:
        grad_w.zero_()
    if wanted.grad_h and group is not None:
        vocab_parallel.all_reduce(grad_h, group)
    return loss, grad_h, grad_w, grad_b, stats
