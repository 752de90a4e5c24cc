"""The custom op `pmi_kernels::pmi_kl_rows`: the loss per row of logit streams, the student's
gradient computed in the same forward, and its autograd.

The op is the launcher (chunks the rows, allocates the loss, the gradient and the statistics,
calls the backend's row function); keeping it opaque lets torch.compile trace pmi_kl whole.

The forward writes the gradient already scaled by the incoming gradient the reduction will send
back for an upstream of 1 (1/count for "mean", 1 otherwise, reduction.forward_grad_scale).
When that is what arrives, the backward returns it untouched: no extra pass over [N, V].

Its autograd is registered on the op itself (register_autograd), unlike the fused op's
(ops/fused.py, an autograd.Function around the op): here the only gradient is the student's,
which the caller asks for by compute_grad, and the reduction outside the op needs no state.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import vocab_parallel
from ..backends import REGISTRY, STATS
from ..lazy_dynamo import defer_dynamo_import
from ..options import compute_dtype
from ..reduction import DOUBLE_BACKWARD
from .autograd import upstream_matches
from .planner import logits_chunk_rows
from .schema import loss_options


def _pmi_kl_rows(
    student: Tensor,
    teacher: Tensor,
    refonly: Optional[Tensor],
    anchor: Optional[Tensor],
    mask: Optional[Tensor],
    grad_scale: Tensor,
    pmi: bool,
    beta: float,
    clip: Optional[float],
    center: bool,
    temperature: float,
    jsd_beta: float,
    entry_clip: Optional[float],
    backend: str,
    compute_grad: bool,
    want_stats: bool,
    workspace_bytes: Optional[int],
    group: Optional[str],
) -> Tuple[Tensor, Tensor, Tensor]:
    """The loss per row of logit rows, the student's gradient and the row statistics.

    Args:
        student, teacher, refonly, anchor: logit rows [N, V], contiguous (refonly, anchor optional).
        mask: [N] bool, the rows that count (None: all).
        grad_scale: [N] in the compute dtype, folded into the gradient (a stride-0 view of one
            value is fine).
        pmi, beta, clip, center, temperature, jsd_beta, entry_clip: the loss options
            (options.LossOptions; clip, entry_clip None: no clip).
        backend: a name in backends.REGISTRY.
        compute_grad, want_stats: whether to compute the gradient and the statistics.
        workspace_bytes: bounds the backend's temporaries per chunk (None: the default).
        group: the name of the process group the vocabulary is split over (vocab_parallel.py).
    Returns:
        loss [N] in the compute dtype (0 where masked); grad_scale * dloss/dstudent [N, V] in the
        student's dtype when compute_grad; the statistics [N, len(STATS)] when want_stats. What
        is not asked for is an empty tensor.
    """
    opts = loss_options(pmi, beta, clip, center, temperature, jsd_beta, entry_clip)
    impl = REGISTRY[backend]
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    n, vocab = student.shape
    loss = torch.empty(n, dtype=compute_dtype(student.dtype), device=student.device)
    stats = loss.new_empty(n, len(STATS)) if want_stats else loss.new_empty(0)
    rows_fn, kappa, planned_vocab = impl.rows, None, vocab
    if group is not None:
        pg = vocab_parallel.group_of(group)
        rows_fn = functools.partial(vocab_parallel.parallel_rows, impl, group=pg)
        kappa = vocab_parallel.logits_kappa(
            teacher, refonly, opts, vocab_parallel.global_vocab(vocab, pg, student.device), pg
        )
        # Every rank must sweep the same chunks: they are planned for the widest shard.
        planned_vocab = vocab_parallel.widest_shard(vocab, pg, student.device)
    step = max(1, logits_chunk_rows(impl, student.device, n, planned_vocab, student.dtype, workspace_bytes))
    for i in range(0, n, step):
        rows = slice(i, i + step)

        def chunk(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x[rows]

        loss[rows] = rows_fn(
            student[rows],
            teacher[rows],
            chunk(refonly),
            chunk(anchor),
            opts=opts,
            kappa=chunk(kappa),
            mask=chunk(mask),
            row_scale=grad_scale[rows],
            grad_out=grad[rows] if compute_grad else None,
            stats_out=stats[rows] if want_stats else None,
        )
    return loss, grad, stats


pmi_kl_rows = torch.library.custom_op("pmi_kernels::pmi_kl_rows", _pmi_kl_rows, mutates_args=())
defer_dynamo_import(pmi_kl_rows)
# The op's arguments by name, in schema order: its autograd reads its inputs by name.
_ARGUMENTS = tuple(inspect.signature(_pmi_kl_rows).parameters)
_TENSORS = ("student", "teacher", "refonly", "anchor", "mask", "grad_scale")


@pmi_kl_rows.register_fake
def _(
    student: Tensor,
    teacher: Tensor,
    refonly: Optional[Tensor],
    anchor: Optional[Tensor],
    mask: Optional[Tensor],
    grad_scale: Tensor,
    pmi: bool,
    beta: float,
    clip: Optional[float],
    center: bool,
    temperature: float,
    jsd_beta: float,
    entry_clip: Optional[float],
    backend: str,
    compute_grad: bool,
    want_stats: bool,
    workspace_bytes: Optional[int],
    group: Optional[str],
) -> Tuple[Tensor, Tensor, Tensor]:
    loss = student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))
    return (
        loss,
        torch.empty_like(student) if compute_grad else student.new_empty(0),
        loss.new_empty(student.shape[0], len(STATS)) if want_stats else loss.new_empty(0),
    )


def _setup_context(ctx, inputs: tuple, output: Tuple[Tensor, Tensor, Tensor]) -> None:
    named = dict(zip(_ARGUMENTS, inputs))
    tensors = [named[name] for name in _TENSORS]
    ctx.settings = {name: value for name, value in named.items() if name not in _TENSORS}
    ctx.mark_non_differentiable(output[1], output[2])
    if not named["compute_grad"]:  # the backward computes the gradient
        ctx.save_for_backward(*tensors)
        return
    if torch.compiler.is_compiling() or type(output[1]) is not torch.Tensor:
        # A traced graph (fake or functional tensors) passes the gradient to its backward as a
        # saved tensor: one held on ctx is no node of the backward graph (AOT's partitioner
        # refused it: "Node mul was invalid, but is output").
        ctx.save_for_backward(*tensors, output[1])
        return
    # The gradient the forward computed is handed to the caller, who may own and modify it; a
    # retained graph's next backward computes it again from the saved inputs.
    ctx.save_for_backward(*tensors)
    ctx.grad = output[1]


def _backward(ctx, grad_loss: Tensor, _grad: Tensor, _stats: Tensor) -> tuple:
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD.format("pmi_kl"))
    saved = ctx.saved_tensors
    tensors = dict(zip(_TENSORS, saved))
    grad_scale = tensors["grad_scale"]
    grad = saved[len(_TENSORS)] if len(saved) > len(_TENSORS) else ctx.__dict__.pop("grad", None)
    if grad is None:
        grad = pmi_kl_rows(**tensors, **{**ctx.settings, "compute_grad": True, "want_stats": False})[1]
    no_grads = (None,) * (len(_ARGUMENTS) - 1)  # the gradient reaches the student only
    if upstream_matches(grad_loss, grad_scale.to(grad_loss.dtype)):
        return (grad,) + no_grads
    # Rescale in the compute dtype, store in the student's dtype. grad_scale is 1/divisor, never
    # 0; masked rows' gradient is 0 and stays 0.
    factor = (grad_loss / grad_scale)[:, None]
    if len(saved) > len(_TENSORS):
        # Traced: the op's output itself, which the forward also returned; a change in place
        # would make a forward output depend on the backward.
        return (torch.mul(grad, factor).to(grad.dtype),) + no_grads
    return (grad.mul_(factor),) + no_grads  # in place: the tensor is ours


pmi_kl_rows.register_autograd(_backward, setup_context=_setup_context)
