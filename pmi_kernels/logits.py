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

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import validation
from .backends import REGISTRY, chunk_rows, resolve_backend, upstream_matches
from .options import LossOptions, compute_dtype
from .reduction import kept_rows, reduce_rows, upstream_scale

# The autograd of pmi_kl_rows returns a gradient for the student only.
_NO_GRAD_ARGS = (None,) * 9


@torch.library.custom_op("pmi_kernels::pmi_kl_rows", mutates_args=())
def pmi_kl_rows(student: Tensor, teacher: Tensor, refonly: Optional[Tensor], anchor: Optional[Tensor],
                mask: Optional[Tensor], grad_scale: Tensor, options: List[float], backend: str, compute_grad: bool,
                workspace_bytes: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Per-row loss [N] and, when compute_grad, grad_scale_n * dloss_n/dstudent_n [N, V] (else
    an empty tensor). grad_scale is [N] in the compute dtype, possibly a stride-0 view of one value."""
    opts, impl = LossOptions.unpack(options), REGISTRY[backend]
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    n, vocab = student.shape
    loss = torch.empty(n, dtype=compute_dtype(student.dtype), device=student.device)
    step = n if impl.streams_rows else chunk_rows(impl, student.device, vocab, 0, loss.element_size(), workspace_bytes)
    for i in range(0, n, max(1, step)):
        chunk = lambda x: None if x is None else x[i:i + step]  # noqa: E731
        loss[i:i + step] = impl.rows(student[i:i + step], teacher[i:i + step], chunk(refonly), chunk(anchor),
                                     opts=opts, mask=chunk(mask), row_scale=grad_scale[i:i + step],
                                     grad_out=chunk(grad) if compute_grad else None)
    return loss, grad


@pmi_kl_rows.register_fake
def _(student, *args):
    compute_grad = args[7]
    loss = student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))
    return loss, torch.empty_like(student) if compute_grad else student.new_empty(0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[5])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _):
    grad, grad_scale = ctx.saved_tensors
    if upstream_matches(grad_loss, grad_scale.to(grad_loss.dtype)):
        return (grad,) + _NO_GRAD_ARGS
    # Rescale in the compute dtype, store in the student's dtype; never mutate the saved gradient.
    # grad_scale is 1 or 1/max(1, kept rows), never 0; masked rows' gradient is 0 and stays 0.
    ratio = grad_loss / grad_scale
    return (torch.mul(grad, ratio[:, None], out=torch.empty_like(grad)),) + _NO_GRAD_ARGS


pmi_kl_rows.register_autograd(_backward, setup_context=_setup_context)


def pmi_kl(student_logits, teacher_logits, refonly_logits=None, anchor_logits=None, *, mask=None,
           beta=1.0, clip=10.0, center=True, temperature=1.0, jsd_beta=0.5, entry_clip=None,
           reduction="mean", check_finite=True, backend="auto", workspace_bytes=None):
    """PMI-KL loss from logits [..., V] (docs/loss.md); gradient to student_logits only.

    workspace_bytes bounds the temporaries of backend="torch" (default 1 GiB on CUDA, 8 MiB on
    CPU, where chunks that stay in cache run fastest). Under
    torch.compile pass check_finite=False: the check reads a value back to the host.
    """
    streams = {"student_logits": student_logits, "teacher_logits": teacher_logits,
               "refonly_logits": refonly_logits, "anchor_logits": anchor_logits}
    student = validation.check_streams(streams, "V")
    validation.check_mask(mask, student.shape[:-1], student.device)
    validation.check_reduction(reduction)
    validation.check_workspace(workspace_bytes)
    opts = LossOptions(refonly_logits is not None, beta, clip, center, temperature, jsd_beta, entry_clip)
    impl = resolve_backend(backend, student.device)
    if check_finite:
        validation.check_finite(streams)
    lead, vocab = student.shape[:-1], student.shape[-1]
    flat = lambda x: None if x is None else x.reshape(-1, vocab).contiguous()  # noqa: E731
    flat_mask = None if mask is None else mask.reshape(-1)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    rows = math.prod(lead)
    count = kept_rows(flat_mask, rows, compute_dtype(student.dtype), student.device)
    scale = upstream_scale(count, reduction)
    per_row, _ = pmi_kl_rows(flat(student), flat(teacher_logits), flat(refonly_logits), flat(anchor_logits),
                             flat_mask, scale.expand(rows), opts.pack(), impl.name, compute_grad, workspace_bytes)
    return reduce_rows(per_row.reshape(lead), count, reduction)
