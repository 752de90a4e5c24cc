"""The custom op `pmi_kernels::fused_pmi_kl_rows` (the fused path's launcher) and its autograd.

The op drops the masked rows, allocates, and runs the sweep (ops/sweep.py); keeping the
data-dependent chunk loop and the kernels opaque lets torch.compile trace fused_pmi_kl whole.

The gradients are computed in the forward for mean/sum reductions and scaled by the incoming
gradient in the backward; reduction="none" recomputes in the backward with the per-row
incoming gradient folded into the kernel. Masked rows never reach a GEMM.

Its autograd is an autograd.Function around the op, unlike pmi_kl_rows' register_autograd
(ops/logits.py): which gradient GEMMs the forward runs (h, W, b) comes from
ctx.needs_input_grad, known only inside Function.forward, and the reduction runs inside the
Function, so that "none" can defer every gradient to the backward while "mean" and "sum"
compute them in the forward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import STATS
from ..lazy_dynamo import defer_dynamo_import
from ..options import compute_dtype
from ..reduction import DOUBLE_BACKWARD, folds_denominator, forward_grad_scale, reduce_rows
from .autograd import scaled, upstream_matches
from .schema import loss_options
from .sweep import FusedInputs, SweepPlan, Wanted, sweep


@torch.library.custom_op("pmi_kernels::fused_pmi_kl_rows", mutates_args=())
def fused_pmi_kl_rows(
    h: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    h_t: Tensor,
    h_r: Optional[Tensor],
    h_a: Optional[Tensor],
    w_f: Tensor,
    b_f: Optional[Tensor],
    mask: Optional[Tensor],
    row_scale: Optional[Tensor],
    pmi: bool,
    beta: float,
    clip: Optional[float],
    center: bool,
    temperature: float,
    jsd_beta: float,
    entry_clip: Optional[float],
    backend: str,
    group: Optional[str],
    chunk_rows: int,
    grad_weight_fp32: bool,
    want_h: bool,
    want_w: bool,
    want_b: bool,
    want_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The launcher of the fused sweep.

    Args:
        h, h_t: the student's and the teacher's hidden states [N, H]; h_r, h_a: the
            reference-only and anchor states [N, H] (optional).
        w, b: the student's head [V, H] and bias [V] (optional); w_f, b_f: the frozen streams'.
        mask: [N] bool, the rows that count (None: all).
        row_scale: [N], folded into the gradients (None: 1).
        pmi, beta, clip, center, temperature, jsd_beta, entry_clip: the loss options
            (options.LossOptions; clip, entry_clip None: no clip).
        backend, group, chunk_rows, grad_weight_fp32: as in sweep.SweepPlan.
        want_h, want_w, want_b, want_stats: what to compute beside the loss.
    Returns:
        loss [N] (0 where masked), grad_h [N, H], grad_w [V, H] (fp32 when grad_weight_fp32),
        grad_b [V] in the compute dtype, stats [N, len(STATS)]; anything not wanted is an
        empty tensor. Masked rows are dropped before any GEMM (the gather copies only
        [n_kept, H] per stream), so the shapes never depend on the mask's values and
        torch.compile traces the call whole.
    """
    plan = SweepPlan(
        loss_options(pmi, beta, clip, center, temperature, jsd_beta, entry_clip),
        backend,
        group,
        chunk_rows,
        grad_weight_fp32,
    )
    kept = None if mask is None else mask.nonzero().squeeze(1)

    def pick(x: Optional[Tensor]) -> Optional[Tensor]:
        return x if x is None or kept is None else x[kept]

    def scatter(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.new_zeros(h.shape[0], *x.shape[1:]).index_copy_(0, kept, x)

    inputs = FusedInputs(pick(h), w, b, pick(h_t), pick(h_r), pick(h_a), w_f, b_f)
    # The GEMMs run in the dtypes given (fused_pmi_kl has applied any autocast already); the
    # gradient GEMMs write into preallocated outputs, which autocast would refuse.
    with torch.autocast(h.device.type, enabled=False):
        loss, grad_h, grad_w, grad_b, stats = sweep(
            plan, inputs, pick(row_scale), Wanted(want_h, want_w, want_b, want_stats)
        )
    if kept is not None:
        loss, grad_h, stats = scatter(loss), scatter(grad_h), scatter(stats)
    return tuple(h.new_empty(0) if x is None else x for x in (loss, grad_h, grad_w, grad_b, stats))


defer_dynamo_import(fused_pmi_kl_rows)


@fused_pmi_kl_rows.register_fake
def _(
    h: Tensor,
    w: Tensor,
    b: Optional[Tensor],
    h_t: Tensor,
    h_r: Optional[Tensor],
    h_a: Optional[Tensor],
    w_f: Tensor,
    b_f: Optional[Tensor],
    mask: Optional[Tensor],
    row_scale: Optional[Tensor],
    pmi: bool,
    beta: float,
    clip: Optional[float],
    center: bool,
    temperature: float,
    jsd_beta: float,
    entry_clip: Optional[float],
    backend: str,
    group: Optional[str],
    chunk_rows: int,
    grad_weight_fp32: bool,
    want_h: bool,
    want_w: bool,
    want_b: bool,
    want_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    def shaped(want: bool, *size, dtype: Optional[torch.dtype] = None) -> Tensor:
        return h.new_empty(*size, dtype=dtype) if want else h.new_empty(0)

    acc = compute_dtype(h.dtype)
    return (
        h.new_empty(h.shape[0], dtype=acc),
        shaped(want_h, h.shape),
        shaped(want_w, w.shape, dtype=compute_dtype(w.dtype) if grad_weight_fp32 else w.dtype),
        shaped(want_b, w.shape[0], dtype=compute_dtype(w.dtype)),
        shaped(want_stats, h.shape[0], len(STATS), dtype=acc),
    )


def _rows(
    plan: SweepPlan, inputs: FusedInputs, mask: Optional[Tensor], row_scale: Optional[Tensor], wanted: Wanted
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fused_pmi_kl_rows with its arguments by name."""
    return fused_pmi_kl_rows(
        *inputs,
        mask,
        row_scale,
        **plan.opts.op_arguments(),
        backend=plan.backend,
        group=plan.group,
        chunk_rows=plan.chunk_rows,
        grad_weight_fp32=plan.grad_weight_fp32,
        want_h=wanted.grad_h,
        want_w=wanted.grad_w,
        want_b=wanted.grad_b,
        want_stats=wanted.stats,
    )


class FusedPMIKL(torch.autograd.Function):
    """(loss, per-row loss, row statistics): the per-row loss [N] for reduction="none", else the
    masked sum over `denominator`; the last two only when want_stats (else empty tensors)."""

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        w: Tensor,
        b: Optional[Tensor],
        h_t: Tensor,
        h_r: Optional[Tensor],
        h_a: Optional[Tensor],
        w_f: Tensor,
        b_f: Optional[Tensor],
        mask: Optional[Tensor],
        denominator: Tensor,
        reduction: str,
        grad_enabled: bool,
        plan: SweepPlan,
        want_stats: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        # needs_input_grad ignores torch.no_grad(): grad_enabled is the grad mode of the call.
        needs = ctx.needs_input_grad
        wants = tuple(grad_enabled and need for need in (needs[0], needs[1], b is not None and needs[2]))
        ctx.plan, ctx.wants, ctx.reduction = plan, wants, reduction
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        inputs = FusedInputs(h, w, b, h_t, h_r, h_a, w_f, b_f)
        grads = []
        if reduction == "none" or not any(wants):
            loss, _, _, _, stats = _rows(plan, inputs, mask, None, Wanted(stats=want_stats))
        else:
            # One sweep computes the gradients for an incoming gradient of 1 (fp16: of denominator).
            loss, *grads, stats = _rows(
                plan,
                inputs,
                mask,
                forward_grad_scale(denominator, h.dtype).expand(h.shape[0]),
                Wanted(*wants, stats=want_stats),
            )
        if torch.compiler.is_compiling() or not grads:
            ctx.save_for_backward(*inputs, mask, denominator, *grads)
        else:
            # The gradients are handed to the caller, who may own and modify them (zero .grad, or
            # scale what autograd.grad returned, in place); a retained graph's next backward
            # computes them again from the saved inputs.
            ctx.save_for_backward(*inputs, mask, denominator)
            ctx.grads = grads
        per_row = loss.clone() if want_stats else loss.new_empty(0)
        ctx.mark_non_differentiable(per_row, stats)
        return reduce_rows(loss, denominator, reduction), per_row, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_per_row: Tensor, _grad_stats: Tensor) -> tuple:
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD.format("fused_pmi_kl"))
        saved = ctx.saved_tensors
        inputs, mask, denominator, grads = FusedInputs(*saved[:8]), saved[8], saved[9], list(saved[10:])
        wanted = Wanted(*ctx.wants)
        if ctx.reduction == "none":
            # grad_loss has the loss's (compute) dtype: it is the per-row scale as it comes.
            grads = _rows(ctx.plan, inputs, mask, grad_loss, wanted)[1:4]
        else:
            dtype, rows = inputs.h.dtype, inputs.h.shape[0]
            if not grads:
                grads = (
                    ctx.__dict__.pop("grads", None)
                    or _rows(ctx.plan, inputs, mask, forward_grad_scale(denominator, dtype).expand(rows), wanted)[1:4]
                )
            factor = grad_loss if folds_denominator(dtype) else grad_loss / denominator  # what the forward left out
            if not upstream_matches(factor, torch.ones_like(factor)):
                grads = [scaled(x, factor) for x in grads]
        grad_h, grad_w, grad_b = (x if want else None for x, want in zip(grads, ctx.wants))
        w_dtype, b_dtype = ctx.dtypes
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 11
