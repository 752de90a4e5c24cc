"""`pmi_kl`: the PMI-KL loss from logit streams.

Layering: a backend's row function -> the `pmi_kernels::pmi_kl_rows` custom op (ops/logits.py:
the launcher, which computes the loss and the student's gradient in the forward, and its
autograd) -> `pmi_kl` (call preparation, flattening, mask reduction). The custom op keeps the
kernels opaque to torch.compile, so `torch.compile(fullgraph=True)` traces through pmi_kl.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .call import prepare
from .ops.logits import pmi_kl_rows
from .reduction import divisor, forward_grad_scale, reduce_rows, stats_dict

Number = Union[float, Tensor]


def pmi_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    refonly_logits: Optional[Tensor] = None,
    anchor_logits: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    normalizer: Optional[Number] = None,
    beta: Number = 1.0,
    clip: Optional[Number] = 10.0,
    center: bool = True,
    temperature: Number = 1.0,
    jsd_beta: Number = 0.5,
    entry_clip: Optional[Number] = None,
    reduction: str = "mean",
    return_stats: bool = False,
    check_finite: bool = True,
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """The PMI-KL loss from logit streams (docs/loss.md); the gradient reaches student_logits only.

    Args:
        student_logits: the student's logits; takes the gradient.
        teacher_logits: the teacher's (question + reference).
        refonly_logits: the reference only; None: standard OPSD, q = softmax(teacher).
        anchor_logits: the target's base; None: the student's logits, detached.
        mask: the positions that count (bool, or 0/1 integers); or
        labels, ignore_index: they count where labels != ignore_index (pass one of mask, labels).
        normalizer: a number or 0-d tensor (e.g. TRL's num_items_in_batch) that divides the
            masked sum instead of the count.
        beta, clip, center, temperature, jsd_beta, entry_clip: the loss options (docs/loss.md);
            clip or entry_clip None: no clip.
        reduction: "mean" divides the masked sum by the number of counted positions, "sum" does
            not, "none" returns the per-position losses.
        return_stats: also return the per-position statistics, from the same sweep.
        check_finite: reject NaN/inf in any stream (a device sync; pass False under torch.compile).
        backend: "auto", "triton", "cuda", "cpu" or "torch" (docs/backends.md).
        workspace_bytes: bounds the torch backend's temporaries (default: the CPU's cache, or
            1 GiB on a GPU).
        process_group: the vocabulary is split over this torch.distributed group, each rank
            passing its contiguous shard of the logit columns in rank order
            (docs/distributed.md); the loss is the whole vocabulary's on every rank, the
            gradient that of this rank's columns.
    Shapes:
        the four streams: one shape [..., V], one dtype (bf16, fp16, fp32 or fp64), one device;
        [...] is flattened. mask, labels: [...].
    Returns:
        The loss: a 0-d tensor, or [...] for reduction="none", in the compute dtype (fp32, fp64
        for fp64). With return_stats, (loss, stats): stats maps "loss", "kl_target_student"
        = KL(q || p), "entropy_student" and "entropy_target" to [...] tensors, 0 where masked.
    """
    streams = {
        "student_logits": student_logits,
        "teacher_logits": teacher_logits,
        "refonly_logits": refonly_logits,
        "anchor_logits": anchor_logits,
    }
    call = prepare(
        streams,
        "V",
        beta=beta,
        clip=clip,
        center=center,
        temperature=temperature,
        jsd_beta=jsd_beta,
        entry_clip=entry_clip,
        backend=backend,
        workspace_bytes=workspace_bytes,
        check_finite=check_finite,
        trainable=("student_logits",),
        reduction=reduction,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        normalizer=normalizer,
        return_stats=return_stats,
        process_group=process_group,
    )
    vocab = call.shape[-1]

    def flat(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.reshape(-1, vocab).contiguous()

    flat_mask = None if call.mask is None else call.mask.reshape(-1)
    (compute_grad,) = call.gradient
    denominator = divisor(flat_mask, call.rows, reduction, normalizer, call.compute_dtype, call.device)
    grad_scale = forward_grad_scale(denominator, call.dtype)  # the backward rescales what it leaves out
    per_row, _, stats = pmi_kl_rows(
        flat(student_logits),
        flat(teacher_logits),
        flat(refonly_logits),
        flat(anchor_logits),
        flat_mask,
        grad_scale.expand(call.rows),
        **call.opts.op_arguments(),
        backend=call.backend.name,
        compute_grad=compute_grad,
        want_stats=return_stats,
        workspace_bytes=workspace_bytes,
        group=call.group,
    )
    loss = reduce_rows(per_row.reshape(call.lead), denominator, reduction)
    return (loss, stats_dict(per_row, stats, call.lead)) if return_stats else loss
