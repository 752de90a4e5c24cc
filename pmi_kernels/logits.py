"""`pmi_kl`: the PMI-KL loss from logit streams.

Layering: row kernel (triton_rows / rows_torch) -> `pmi_kl_rows` custom op (launcher:
allocates the loss and the student gradient, computed in the forward) with its autograd
registered -> `pmi_kl` (checks, flattening, mask reduction). The custom op keeps the
kernel opaque to torch.compile, so `torch.compile(fullgraph=True)` traces through pmi_kl.

The forward writes the gradient already scaled by the incoming gradient the reduction
will send back for an upstream of 1 (1/count for "mean", 1 otherwise). When that is what
arrives, the backward returns it untouched: no extra pass over [N, V].
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import validation
from .backends import (TORCH_ROW_TEMPORARIES, default_workspace_bytes, resolve_backend, row_function, rows_per_chunk,
                       upstream_matches)
from .options import LossOptions
from .reference import compute_dtype


@torch.library.custom_op("pmi_kernels::pmi_kl_rows", mutates_args=())
def pmi_kl_rows(student: Tensor, teacher: Tensor, refonly: Optional[Tensor], anchor: Optional[Tensor],
                mask: Optional[Tensor], grad_scale: Tensor, pmi: bool, beta: float, clip: Optional[float], center: bool,
                temperature: float, jsd_beta: float, entry_clip: Optional[float], backend: str,
                compute_grad: bool, workspace_bytes: int) -> Tuple[Tensor, Tensor]:
    """Per-row loss [N] and, when compute_grad, grad_scale_n * dloss_n/dstudent_n [N, V] (else
    an empty tensor). grad_scale is [N] in the compute dtype, possibly a stride-0 view of one value."""
    opts = LossOptions(pmi, beta, clip, center, temperature, jsd_beta, entry_clip)
    rows_fn = row_function(backend)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    if backend == "triton":
        # The kernel streams rows itself: no chunking, no temporaries.
        loss = rows_fn(student, teacher, refonly, anchor, opts=opts, mask=mask, row_scale=grad_scale,
                       grad_out=grad if compute_grad else None)
        return loss, grad
    n, vocab = student.shape
    loss = torch.empty(n, dtype=compute_dtype(student.dtype), device=student.device)
    step = rows_per_chunk(vocab, TORCH_ROW_TEMPORARIES * loss.element_size(), workspace_bytes)
    for i in range(0, n, step):
        chunk = lambda x: None if x is None else x[i:i + step]  # noqa: E731
        loss[i:i + step] = rows_fn(student[i:i + step], teacher[i:i + step], chunk(refonly), chunk(anchor),
                                   opts=opts, mask=chunk(mask), row_scale=grad_scale[i:i + step],
                                   grad_out=chunk(grad) if compute_grad else None)
    return loss, grad


@pmi_kl_rows.register_fake
def _(student, teacher, refonly, anchor, mask, grad_scale, pmi, beta, clip, center, temperature, jsd_beta,
      entry_clip, backend, compute_grad, workspace_bytes):
    loss = student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))
    return loss, torch.empty_like(student) if compute_grad else student.new_empty(0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[5])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _):
    grad, grad_scale = ctx.saved_tensors
    if upstream_matches(grad_loss, grad_scale.to(grad_loss.dtype)):
        return (grad,) + (None,) * 15
    # Rescale in the compute dtype, store in the student's dtype; never mutate the saved gradient.
    # grad_scale is 1 or 1/max(1, kept rows), never 0; masked rows' gradient is 0 and stays 0.
    ratio = grad_loss / grad_scale
    return (torch.mul(grad, ratio[:, None], out=torch.empty_like(grad)),) + (None,) * 15


pmi_kl_rows.register_autograd(_backward, setup_context=_setup_context)


def kept_rows(mask: Optional[Tensor], rows: int, dtype, device) -> Tensor:
    """max(1, number of kept rows), as a tensor (no host sync, so torch.compile traces it)."""
    if mask is None:
        return torch.tensor(max(1, rows), dtype=dtype, device=device)
    return mask.sum().to(dtype).clamp_min(1)


def reduce_rows(per_row: Tensor, count: Tensor, reduction: str) -> Tensor:
    """Masked rows are already exactly 0; the mean divides by max(1, count of kept rows)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / count


def pmi_kl(student_logits, teacher_logits, refonly_logits=None, anchor_logits=None, *, mask=None,
           beta=1.0, clip=10.0, center=True, temperature=1.0, jsd_beta=0.5, entry_clip=None,
           reduction="mean", check_finite=True, backend="auto", workspace_bytes=None):
    """PMI-KL loss from logits [..., V] (../shared/SPEC.md); gradient to student_logits only.

    workspace_bytes bounds the temporaries of backend="torch" (default 1 GiB on CUDA, 8 MiB on
    CPU, where chunks that stay in cache run fastest). Under
    torch.compile pass check_finite=False: the check reads a value back to the host.
    """
    streams = {"student_logits": student_logits, "teacher_logits": teacher_logits,
               "refonly_logits": refonly_logits, "anchor_logits": anchor_logits}
    student = validation.check_streams(streams, "V")
    validation.check_mask(mask, student.shape[:-1], student.device)
    validation.check_reduction_and_backend(reduction, backend)
    opts = LossOptions(refonly_logits is not None, beta, clip, center, temperature, jsd_beta, entry_clip)
    backend = resolve_backend(backend, student.device)
    if check_finite:
        validation.check_finite(streams)
    lead, vocab = student.shape[:-1], student.shape[-1]
    flat = lambda x: None if x is None else x.reshape(-1, vocab).contiguous()  # noqa: E731
    flat_mask = None if mask is None else mask.reshape(-1)
    compute_grad = torch.is_grad_enabled() and student.requires_grad
    rows = math.prod(lead)
    count = kept_rows(flat_mask, rows, compute_dtype(student.dtype), student.device)
    # What the reduction sends back to each row for an upstream gradient of 1.
    scale = count.new_ones(()) / count if reduction == "mean" else count.new_ones(())
    workspace = default_workspace_bytes(backend, student.device) if workspace_bytes is None else int(workspace_bytes)
    per_row, _ = pmi_kl_rows(flat(student), flat(teacher_logits), flat(refonly_logits), flat(anchor_logits),
                             flat_mask, scale.expand(rows), opts.pmi, opts.beta, opts.clip, opts.center,
                             opts.temperature, opts.jsd_beta, opts.entry_clip, backend, compute_grad, workspace)
    return reduce_rows(per_row.reshape(lead), count, reduction)
