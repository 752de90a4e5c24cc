"""`pmi_kl`: the PMI-KL loss from logit streams.

Layering: a backend's row function -> `pmi_kl_rows` custom op (launcher: allocates the loss
and the student gradient, computed in the forward) with its autograd registered -> `pmi_kl`
(checks, flattening, mask reduction). The custom op keeps the kernels opaque to
torch.compile, so `torch.compile(fullgraph=True)` traces through pmi_kl.

The forward writes the gradient already scaled by the incoming gradient the reduction
will send back for an upstream of 1 (1/count for "mean", 1 otherwise). When that is what
arrives, the backward returns it untouched: no extra pass over [N, V].
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import validation, vocab_parallel
from .backends import REGISTRY, STATS, chunk_rows, resolve_backend, upstream_matches
from .lazy_dynamo import defer_dynamo_import
from .options import LossOptions, compute_dtype
from .reduction import DOUBLE_BACKWARD, divisor, forward_grad_scale, reduce_rows, stats_dict

# The autograd of pmi_kl_rows returns a gradient for the student only.
_NO_GRAD_ARGS = (None,) * 11

@torch.library.custom_op("pmi_kernels::pmi_kl_rows", mutates_args=())
def pmi_kl_rows(student: Tensor, teacher: Tensor, refonly: Optional[Tensor], anchor: Optional[Tensor],
                mask: Optional[Tensor], grad_scale: Tensor, options: List[float], backend: str, compute_grad: bool,
                want_stats: bool, workspace_bytes: Optional[int], group: Optional[str]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row loss [N]; when compute_grad, grad_scale_n * dloss_n/dstudent_n [N, V]; when
    want_stats, the row statistics [N, 3] (backends.STATS). What is not asked for is an empty
    tensor. grad_scale is [N] in the compute dtype, possibly a stride-0 view of one value.
    group: the name of the process group the vocabulary is split over (vocab_parallel.py)."""
    opts, impl = LossOptions.unpack(options), REGISTRY[backend]
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    n, vocab = student.shape
    loss = torch.empty(n, dtype=compute_dtype(student.dtype), device=student.device)
    stats = loss.new_empty(n, len(STATS)) if want_stats else loss.new_empty(0)
    rows_fn, kappa, planned_vocab = impl.rows, None, vocab
    if group is not None:
        pg = vocab_parallel.group_of(group)
        rows_fn = functools.partial(vocab_parallel.parallel_rows, impl, group=pg)
        kappa = vocab_parallel.logits_kappa(teacher, refonly, opts,
                                            vocab_parallel.global_vocab(vocab, pg, student.device), pg)
        # Every rank must sweep the same chunks: they are planned for the widest shard.
        planned_vocab = vocab_parallel.widest_shard(vocab, pg, student.device)
    step = n if impl.streams_rows else chunk_rows(impl, student.device, planned_vocab, 0, loss.element_size(),
                                                  workspace_bytes)
    for i in range(0, n, max(1, step)):
        chunk = lambda x: None if x is None else x[i:i + step]  # noqa: E731
        loss[i:i + step] = rows_fn(student[i:i + step], teacher[i:i + step], chunk(refonly), chunk(anchor),
                                   opts=opts, kappa=chunk(kappa), mask=chunk(mask), row_scale=grad_scale[i:i + step],
                                   grad_out=chunk(grad) if compute_grad else None,
                                   stats_out=chunk(stats) if want_stats else None)
    return loss, grad, stats


defer_dynamo_import(pmi_kl_rows)


@pmi_kl_rows.register_fake
def _(student, *args):
    compute_grad, want_stats = args[7], args[8]
    loss = student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))
    return (loss, torch.empty_like(student) if compute_grad else student.new_empty(0),
            loss.new_empty(student.shape[0], len(STATS)) if want_stats else loss.new_empty(0))


def _setup_context(ctx, inputs, output):
    # The gradient the forward computed is handed to the caller, who may own and modify it; a
    # retained graph's next backward computes it again from the saved inputs.
    ctx.save_for_backward(*inputs[:6])
    ctx.rest, ctx.grad = inputs[6:], output[1]
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, _grad, _stats):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD.format("pmi_kl"))
    *tensors, grad_scale = ctx.saved_tensors
    grad = ctx.__dict__.pop("grad", None)
    if grad is None:
        options, backend, _, _, workspace, group = ctx.rest
        grad = pmi_kl_rows(*tensors, grad_scale, options, backend, True, False, workspace, group)[1]
    if upstream_matches(grad_loss, grad_scale.to(grad_loss.dtype)):
        return (grad,) + _NO_GRAD_ARGS
    # Rescale in the compute dtype, store in the student's dtype, in place (the tensor is ours).
    # grad_scale is 1/divisor, never 0; masked rows' gradient is 0 and stays 0.
    return (grad.mul_((grad_loss / grad_scale)[:, None]),) + _NO_GRAD_ARGS


pmi_kl_rows.register_autograd(_backward, setup_context=_setup_context)


def pmi_kl(student_logits, teacher_logits, refonly_logits=None, anchor_logits=None, *, mask=None, labels=None,
           ignore_index=-100, normalizer=None, beta=1.0, clip=10.0, center=True, temperature=1.0, jsd_beta=0.5,
           entry_clip=None, reduction="mean", return_stats=False, check_finite=True, backend="auto",
           workspace_bytes=None, process_group=None):
    """The PMI-KL loss from logit streams [..., V] (docs/loss.md); the gradient reaches
    student_logits only.

    Streams: student_logits (takes the gradient), teacher_logits (question + reference),
    refonly_logits (reference only; None: standard OPSD, q = softmax(teacher)), anchor_logits
    (the target's base; None: the student's logits, detached). All share one shape [..., V],
    dtype (bf16, fp16, fp32 or fp64) and device; [...] is flattened.
    Positions that count: mask [...] (bool, or 0/1 integers), or labels [...] with
    ignore_index (they count where labels != ignore_index). reduction "mean" divides the masked
    sum by the number of counted positions, "sum" does not, "none" returns the [...] losses;
    normalizer (a number or 0-d tensor, e.g. TRL's num_items_in_batch) divides the masked sum
    instead. return_stats=True returns (loss, stats): per-position "loss", "kl_target_student"
    = KL(q || p), "entropy_student", "entropy_target", from the same sweep. check_finite=True
    rejects NaN/inf in any stream (a device sync; pass False under torch.compile).
    backend: "auto", "triton", "cuda", "cpu" or "torch" (docs/backends.md); workspace_bytes
    bounds the torch backend's temporaries (default: the CPU's cache, or 1 GiB on a GPU).
    process_group: the vocabulary is split over this torch.distributed group, each rank passing
    its contiguous shard of the logit columns in rank order (docs/distributed.md); the loss is
    the whole vocabulary's on every rank, the gradient that of this rank's columns.
    """
    group = vocab_parallel.group_name(process_group)
    with vocab_parallel.Agreement(group) as agreement:
        streams = {"student_logits": student_logits, "teacher_logits": teacher_logits,
                   "refonly_logits": refonly_logits, "anchor_logits": anchor_logits}
        student = validation.check_streams(streams, "V")
        lead, vocab = student.shape[:-1], student.shape[-1]
        mask = validation.counted_positions(mask, labels, ignore_index, lead, student.device)
        validation.check_reduction(reduction)
        validation.check_normalizer(normalizer, reduction)
        validation.check_workspace(workspace_bytes)
        for name, flag in (("return_stats", return_stats), ("check_finite", check_finite)):
            validation.check_bool(name, flag)
        opts = LossOptions(pmi=refonly_logits is not None, beta=beta, clip=clip, center=center, temperature=temperature,
                           jsd_beta=jsd_beta, entry_clip=entry_clip)
        impl = resolve_backend(backend, student.device)
        if check_finite:
            validation.check_finite(streams)
        if group is not None:  # chunks and the phases' collectives run alike, on one target
            agreement.fingerprint = vocab_parallel.call_fingerprint(
                lead, student.dtype, streams, opts, mask, normalizer, reduction=reduction, return_stats=return_stats,
                check_finite=check_finite, backend=impl.name, workspace_bytes=workspace_bytes,
                gradient=torch.is_grad_enabled() and student.requires_grad)
    flat = lambda x: None if x is None else x.reshape(-1, vocab).contiguous()  # noqa: E731
    flat_mask = None if mask is None else mask.reshape(-1)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    rows = math.prod(lead)
    denominator = divisor(flat_mask, rows, reduction, normalizer, compute_dtype(student.dtype), student.device)
    grad_scale = forward_grad_scale(denominator, student.dtype)  # the backward rescales what it leaves out
    per_row, _, stats = pmi_kl_rows(flat(student), flat(teacher_logits), flat(refonly_logits), flat(anchor_logits),
                                    flat_mask, grad_scale.expand(rows), opts.pack(), impl.name, compute_grad,
                                    return_stats, workspace_bytes, group)
    loss = reduce_rows(per_row.reshape(lead), denominator, reduction)
    return (loss, stats_dict(per_row, stats, lead)) if return_stats else loss
