"""`fused_pmi_kl`: the PMI-KL loss straight from hidden states and the lm_head weight.

Rows go in chunks sized from a workspace budget; per chunk:
    s      = h W^T + b                      GEMM, [C, V] in the input dtype
    t - r  = (h_T - h_R) W_f^T              ONE GEMM for both frozen streams, where SPEC
                                            allows it (the bias and lse(t) - lse(r) cancel),
                                            the input is not fp16, and not bf16 with the
                                            clip off (streams_apart),
    kappa  = (h_T - h_R) . mean_v(W_f) / tau   the centering mean, from the same product
    row op: loss, and dloss/ds written over s in place
    grad_h = dS W,  grad_W += dS^T h,  grad_b += sum dS      (when those gradients are wanted)
The gradients are computed in the forward for mean/sum reductions and scaled by the
incoming gradient in the backward; reduction="none" recomputes in the backward with the
per-row incoming gradient folded into the kernel. Masked rows never reach a GEMM.
No [N, V] tensor exists at any point.

Layering: `_sweep` (the chunk loop above, calling the backend's row function) ->
`fused_pmi_kl_rows` custom op (launcher: drops masked rows, allocates) -> `_FusedPMIKL`
(autograd) -> `fused_pmi_kl` (checks, flattening).
The custom op keeps the data-dependent chunk loop and the kernels opaque to torch.compile.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import validation, vocab_parallel
from .heads import frozen_head, gather_heads
from .backends import REGISTRY, STATS, chunk_rows, resolve_backend, upstream_matches
from .lazy_dynamo import defer_dynamo_import
from .options import LossOptions, compute_dtype
from .reduction import DOUBLE_BACKWARD, divisor, folds_denominator, forward_grad_scale, reduce_rows, stats_dict


@dataclass(frozen=True)
class _Plan:
    """How the rows are swept: the arguments of the launcher that are not tensors. group names
    the process group the vocabulary is split over (vocab_parallel.py), or is None."""
    opts: LossOptions
    backend: str
    group: Optional[str]
    chunk_rows: int
    grad_weight_fp32: bool

    def op_args(self):
        return self.opts.pack(), self.backend, self.group, self.chunk_rows, self.grad_weight_fp32


def streams_apart(opts: LossOptions, dtype: torch.dtype) -> bool:
    """Whether the teacher's and the reference-only logits take a GEMM each: where lse(t) and
    lse(r) are needed apart; for fp16, where h_T - h_R and t - r can pass its range (6.5e4)
    while each stream stays inside it; and for bf16 with the clip off, where the one product
    rounds h_T - h_R and t - r to bf16 and, with no tanh to bound their effect, those roundings
    moved the loss up to 5x plain torch's bf16 error (docs/loss.md). Otherwise one product of
    h_T - h_R serves both."""
    unclipped_bf16 = dtype == torch.bfloat16 and opts.clip is None
    return opts.separate_lse or dtype == torch.float16 or unclipped_bf16


def _frozen_streams(hc_t, hc_r, hc_a, w_f, b_f, w_f_mean, opts: LossOptions):
    """(t, r, a, kappa) for one chunk; t holds t - r where one GEMM serves both streams."""
    linear = lambda x: None if x is None else F.linear(x, w_f, b_f)  # noqa: E731
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


def _accumulate_grad_weight(grad_w, grad_s, h, first: bool):
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


def _sweep(plan: _Plan, h, w, b, h_t, h_r, h_a, w_f, b_f, row_scale, want_h, want_w, want_b, want_stats):
    """Loss per row [n], the wanted gradients with row_scale [n] folded in, and the row statistics.
    Over a split vocabulary: the whole vocabulary's loss, this shard's weight and bias gradients,
    and the hidden-state gradient summed over the shards."""
    n, vocab = h.shape[0], w.shape[0]
    rows_fn, group, whole_vocab = REGISTRY[plan.backend].rows, None, vocab
    if plan.group is not None:
        group = vocab_parallel.group_of(plan.group)
        rows_fn = functools.partial(vocab_parallel.parallel_rows, REGISTRY[plan.backend], group=group)
        whole_vocab = vocab_parallel.global_vocab(vocab, group, h.device)
    loss = torch.empty(n, dtype=compute_dtype(h.dtype), device=h.device)
    stats = torch.empty(n, len(STATS), dtype=loss.dtype, device=h.device) if want_stats else None
    grad_h = h.new_empty(h.shape) if want_h else None  # contiguous, as the fake's (h may be a transposed view)
    grad_w = torch.empty(w.shape, dtype=compute_dtype(w.dtype) if plan.grad_weight_fp32 else w.dtype,
                         device=w.device) if want_w else None
    grad_b = torch.zeros(vocab, dtype=compute_dtype(w.dtype), device=w.device) if want_b else None
    want_grad = want_h or want_w or want_b
    # Column mean of W_f over the whole vocabulary, accumulated in fp32 without an fp32 copy.
    w_f_mean = None
    if plan.opts.needs_kappa:
        w_f_sum = torch.sum(w_f, 0, dtype=compute_dtype(w_f.dtype))
        w_f_mean = (w_f_sum if group is None else vocab_parallel.all_reduce(w_f_sum, group)) / whole_vocab
    for i in range(0, n, plan.chunk_rows):
        rows = slice(i, i + plan.chunk_rows)
        chunk = lambda x: None if x is None else x[rows]  # noqa: E731
        hc = h[rows]
        s = F.linear(hc, w, b)
        t, r, a, kappa = _frozen_streams(hc_t=chunk(h_t), hc_r=chunk(h_r), hc_a=chunk(h_a),
                                         w_f=w_f, b_f=b_f, w_f_mean=w_f_mean, opts=plan.opts)
        if group is not None and r is not None:  # streams apart: kappa over the whole vocabulary
            kappa = vocab_parallel.logits_kappa(t, r, plan.opts, whole_vocab, group)
        loss[rows] = rows_fn(s, t, r, a, opts=plan.opts, kappa=kappa, row_scale=chunk(row_scale),
                             grad_out=s if want_grad else None, stats_out=chunk(stats))
        # s now holds dloss/ds_raw, scaled per row.
        if want_h:
            torch.mm(s, w, out=grad_h[rows])
        if want_w:
            _accumulate_grad_weight(grad_w, s, hc, first=i == 0)
        if want_b:
            grad_b += s.sum(0, dtype=grad_b.dtype)
        # Free this chunk's buffers before the next chunk allocates its own.
        del s, t, r, a
    if want_w and n == 0:
        grad_w.zero_()
    if want_h and group is not None:
        vocab_parallel.all_reduce(grad_h, group)
    return loss, grad_h, grad_w, grad_b, stats


@torch.library.custom_op("pmi_kernels::fused_pmi_kl_rows", mutates_args=())
def fused_pmi_kl_rows(h: Tensor, w: Tensor, b: Optional[Tensor], h_t: Tensor, h_r: Optional[Tensor],
                      h_a: Optional[Tensor], w_f: Tensor, b_f: Optional[Tensor], mask: Optional[Tensor],
                      row_scale: Optional[Tensor], options: List[float], backend: str, group: Optional[str],
                      chunk_rows: int, grad_weight_fp32: bool, want_h: bool, want_w: bool, want_b: bool,
                      want_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The launcher: loss per row [N] (0 where masked), the wanted gradients with row_scale [N]
    folded in, and the row statistics [N, 3]; anything not wanted is an empty tensor. Masked
    rows are dropped before any GEMM (the gather copies only [n_kept, H] per stream), so the
    shapes never depend on the mask's values and torch.compile traces the call whole."""
    plan = _Plan(LossOptions.unpack(options), backend, group, chunk_rows, grad_weight_fp32)
    kept = None if mask is None else mask.nonzero().squeeze(1)
    pick = lambda x: x if x is None or kept is None else x[kept]  # noqa: E731
    # The GEMMs run in the dtypes given (fused_pmi_kl has applied any autocast already); the
    # gradient GEMMs write into preallocated outputs, which autocast would refuse.
    with torch.autocast(h.device.type, enabled=False):
        loss, grad_h, grad_w, grad_b, stats = _sweep(plan, pick(h), w, b, pick(h_t), pick(h_r), pick(h_a), w_f, b_f,
                                                     pick(row_scale), want_h, want_w, want_b, want_stats)
    if kept is not None:
        scatter = lambda x: None if x is None else x.new_zeros(h.shape[0], *x.shape[1:]).index_copy_(0, kept, x)  # noqa: E731
        loss, grad_h, stats = scatter(loss), scatter(grad_h), scatter(stats)
    return tuple(h.new_empty(0) if x is None else x for x in (loss, grad_h, grad_w, grad_b, stats))


defer_dynamo_import(fused_pmi_kl_rows)


@fused_pmi_kl_rows.register_fake
def _(h, w, *args):
    grad_weight_fp32, want_h, want_w, want_b, want_stats = args[-5:]
    shaped = lambda want, *size, **kwargs: h.new_empty(*size, **kwargs) if want else h.new_empty(0)  # noqa: E731
    acc = compute_dtype(h.dtype)
    return (h.new_empty(h.shape[0], dtype=acc), shaped(want_h, h.shape),
            shaped(want_w, w.shape, dtype=compute_dtype(w.dtype) if grad_weight_fp32 else w.dtype),
            shaped(want_b, w.shape[0], dtype=compute_dtype(w.dtype)), shaped(want_stats, h.shape[0], len(STATS), dtype=acc))


def _rows(plan: _Plan, tensors, row_scale, wants, want_stats=False):
    return fused_pmi_kl_rows(*tensors, row_scale, *plan.op_args(), *wants, want_stats)


def _scaled(x: Tensor, factor: Tensor) -> Tensor:
    """x * factor (a 0-d tensor), each product formed in fp32 (fp64 for fp64) and rounded once to x's
    dtype: factor itself may pass fp16's range (65536), and a bf16 factor (1/3 for gradient
    accumulation) would bias every entry. In slices of about 64 MiB of fp32 outside compile."""
    wide = torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64
    if torch.compiler.is_compiling() or x.dim() == 0 or x.numel() == 0:
        return (x.to(wide) * factor).to(x.dtype)
    out = torch.empty_like(x)
    rows = max(1, (1 << 24) // max(1, x[0].numel()))
    for i in range(0, x.shape[0], rows):
        out[i:i + rows] = x[i:i + rows].to(wide) * factor
    return out


class _FusedPMIKL(torch.autograd.Function):
    """(loss, per-row loss, row statistics): the per-row loss [N] for reduction="none", else the
    masked sum over `denominator`; the last two only when want_stats (else empty tensors)."""

    @staticmethod
    def forward(ctx, h, w, b, h_t, h_r, h_a, w_f, b_f, mask, denominator, reduction: str, grad_enabled: bool,
                plan: _Plan, want_stats: bool):
        # needs_input_grad ignores torch.no_grad(): grad_enabled is the grad mode of the call.
        needs = ctx.needs_input_grad
        wants = tuple(grad_enabled and need for need in (needs[0], needs[1], b is not None and needs[2]))
        ctx.plan, ctx.wants, ctx.reduction = plan, wants, reduction
        ctx.dtypes = (w.dtype, None if b is None else b.dtype)
        tensors = (h, w, b, h_t, h_r, h_a, w_f, b_f, mask)
        grads = []
        if reduction == "none" or not any(wants):
            loss, _, _, _, stats = _rows(plan, tensors, None, (False, False, False), want_stats)
        else:
            # One sweep computes the gradients for an incoming gradient of 1 (fp16: of denominator).
            loss, *grads, stats = _rows(plan, tensors, forward_grad_scale(denominator, h.dtype).expand(h.shape[0]),
                                        wants, want_stats)
        if torch.compiler.is_compiling() or not grads:
            ctx.save_for_backward(*tensors, denominator, *grads)
        else:
            # The gradients are handed to the caller, who may own and modify them (zero .grad, or
            # scale what autograd.grad returned, in place); a retained graph's next backward
            # computes them again from the saved inputs.
            ctx.save_for_backward(*tensors, denominator)
            ctx.grads = grads
        per_row = loss.clone() if want_stats else loss.new_empty(0)
        ctx.mark_non_differentiable(per_row, stats)
        return reduce_rows(loss, denominator, reduction), per_row, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row, _grad_stats):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD.format("fused_pmi_kl"))
        saved = ctx.saved_tensors
        tensors, denominator, grads = saved[:9], saved[9], list(saved[10:])
        if ctx.reduction == "none":
            # grad_loss has the loss's (compute) dtype: it is the per-row scale as it comes.
            grads = _rows(ctx.plan, tensors, grad_loss, ctx.wants)[1:4]
        else:
            dtype, rows = tensors[0].dtype, tensors[0].shape[0]
            if not grads:
                grads = ctx.__dict__.pop("grads", None) or _rows(
                    ctx.plan, tensors, forward_grad_scale(denominator, dtype).expand(rows), ctx.wants)[1:4]
            factor = grad_loss if folds_denominator(dtype) else grad_loss / denominator  # what the forward left out
            if not upstream_matches(factor, torch.ones_like(factor)):
                grads = [_scaled(x, factor) for x in grads]
        grad_h, grad_w, grad_b = (x if want else None for x, want in zip(grads, ctx.wants))
        w_dtype, b_dtype = ctx.dtypes
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 11


def fused_pmi_kl(student_hidden, lm_head_weight, teacher_hidden, refonly_hidden=None, anchor_hidden=None, *,
                 lm_head_bias=None, frozen_weight=None, frozen_bias=None, mask=None, labels=None, ignore_index=-100,
                 normalizer=None, beta=1.0, clip=10.0, center=True, temperature=1.0, jsd_beta=0.5, entry_clip=None,
                 reduction="mean", return_stats=False, check_finite=True, backend="auto", workspace_bytes=None,
                 grad_weight_fp32=False, process_group=None):
    """The PMI-KL loss from final hidden states [..., H] and the lm_head (docs/loss.md),
    never holding [N, V] logits.

    Hidden states (one shape [..., H], dtype and device): student_hidden (takes gradients),
    teacher_hidden, refonly_hidden (None: standard OPSD), anchor_hidden (None: the student,
    detached). lm_head_weight [V, H] and lm_head_bias [V] give the student's logits and take
    gradients when they require them; frozen_weight / frozen_bias give the frozen streams'
    logits, each defaulting on its own to the student's (detached). mask, labels, ignore_index,
    normalizer, the loss options, reduction, return_stats, check_finite and backend are as in
    pmi_kl. workspace_bytes bounds a chunk's logit buffers (default: the CPU's cache, or 1 GiB
    on a GPU); grad_weight_fp32 accumulates the weight gradient over chunks in fp32.
    A head sharded by FSDP2 (DTensor weight, bias or frozen head) is gathered once per call, its
    gradient averaged and reduce-scattered back as FSDP2 does (docs/distributed.md).
    process_group: the vocabulary is split over this torch.distributed group, each rank passing
    its contiguous shard of the lm_head rows (weight, bias, frozen head) in rank order
    (docs/distributed.md); the loss is the whole vocabulary's on every rank, the hidden-state
    gradient is summed over the ranks, the weight and bias gradients are this rank's shard's.
    """
    # Autocast is asked only about device types it knows: another (meta) goes on to the checks, which refuse it.
    if isinstance(student_hidden, torch.Tensor) and torch.amp.is_autocast_available(student_hidden.device.type) \
            and torch.is_autocast_enabled(student_hidden.device.type):
        # Under autocast the head's GEMMs run in the autocast dtype, as F.linear's would (the
        # statistics stay fp32); gradients reach the given (e.g. fp32 master) tensors through the casts.
        dtype = torch.get_autocast_dtype(student_hidden.device.type)
        cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
        student_hidden, lm_head_weight, teacher_hidden, refonly_hidden, anchor_hidden = map(
            cast, (student_hidden, lm_head_weight, teacher_hidden, refonly_hidden, anchor_hidden))
        lm_head_bias, frozen_weight, frozen_bias = map(cast, (lm_head_bias, frozen_weight, frozen_bias))
    heads = gather_heads({"lm_head_weight": lm_head_weight, "lm_head_bias": lm_head_bias,
                          "frozen_weight": frozen_weight, "frozen_bias": frozen_bias})
    lm_head_weight, lm_head_bias, frozen_weight, frozen_bias = heads.values()
    group = vocab_parallel.group_name(process_group)
    with vocab_parallel.Agreement(group) as agreement:
        streams = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden,
                   "refonly_hidden": refonly_hidden, "anchor_hidden": anchor_hidden}
        student = validation.check_streams(streams, "H")
        validation.check_linear(lm_head_weight, lm_head_bias, student, "lm_head_weight", "lm_head_bias")
        validation.check_frozen_head(frozen_weight, frozen_bias, lm_head_weight, lm_head_bias, student)
        w_f, b_f = frozen_head(lm_head_weight, lm_head_bias, frozen_weight, frozen_bias)
        mask = validation.counted_positions(mask, labels, ignore_index, student.shape[:-1], student.device)
        validation.check_reduction(reduction)
        validation.check_normalizer(normalizer, reduction)
        validation.check_workspace(workspace_bytes)
        for name, flag in (("return_stats", return_stats), ("check_finite", check_finite),
                           ("grad_weight_fp32", grad_weight_fp32)):
            validation.check_bool(name, flag)
        opts = LossOptions(pmi=refonly_hidden is not None, beta=beta, clip=clip, center=center, temperature=temperature,
                           jsd_beta=jsd_beta, entry_clip=entry_clip)
        impl = resolve_backend(backend, student.device)
        if check_finite:
            validation.check_finite({**streams, "lm_head_weight": lm_head_weight, "lm_head_bias": lm_head_bias,
                                     "frozen_weight": frozen_weight, "frozen_bias": frozen_bias})
        if group is not None:  # chunks, the phases' collectives and the gradient's all-reduce run alike
            agreement.fingerprint = vocab_parallel.call_fingerprint(
                student.shape, student.dtype, {**streams, **heads}, opts, mask, normalizer, reduction=reduction,
                return_stats=return_stats, check_finite=check_finite, grad_weight_fp32=grad_weight_fp32,
                backend=impl.name, workspace_bytes=workspace_bytes,
                gradient=tuple(torch.is_grad_enabled() and x is not None and x.requires_grad
                               for x in (student, lm_head_weight, lm_head_bias)))

    vocab, hidden = lm_head_weight.shape
    # Chunk buffers: s plus each frozen stream the plan computes, in the input dtype. Chunks
    # sized for the CPU's cache re-read the [V, H] weights each time: at least H/4 rows (on 2
    # CPU cores 2-3x faster than 1 GiB chunks at H <= 256).
    apart = refonly_hidden is not None and streams_apart(opts, student.dtype)
    buffers = 1 + (2 if apart else 1) + (anchor_hidden is not None)
    if group is not None:  # every rank must sweep the same chunks: planned for the widest shard
        vocab = vocab_parallel.widest_shard(vocab, vocab_parallel.group_of(group), student.device)
    rows_per_chunk = chunk_rows(impl, student.device, vocab, buffers * student.element_size(),
                                torch.finfo(compute_dtype(student.dtype)).bits // 8, workspace_bytes,
                                min_rows=hidden // 4)
    # Without 1/denominator folded in, the weight gradient sums unscaled rows: in fp32, past fp16's range.
    plan = _Plan(opts, impl.name, group, rows_per_chunk, grad_weight_fp32 or not folds_denominator(student.dtype))

    flat = lambda x: None if x is None else x.reshape(-1, hidden)  # noqa: E731
    h, h_t, h_r, h_a = map(flat, (student_hidden, teacher_hidden, refonly_hidden, anchor_hidden))
    h_t, h_r, h_a = (None if x is None else x.detach() for x in (h_t, h_r, h_a))
    flat_mask = None if mask is None else mask.reshape(-1)
    denominator = divisor(flat_mask, h.shape[0], reduction, normalizer, compute_dtype(h.dtype), h.device)
    loss, per_row, stats = _FusedPMIKL.apply(h, lm_head_weight, lm_head_bias, h_t, h_r, h_a, w_f, b_f, flat_mask,
                                             denominator, reduction, torch.is_grad_enabled(), plan, return_stats)
    lead = student.shape[:-1]
    loss = loss.reshape(lead) if reduction == "none" else loss
    return (loss, stats_dict(per_row, stats, lead)) if return_stats else loss
