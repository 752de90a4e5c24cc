"""`fused_pmi_kl`: the PMI-KL loss straight from hidden states and the lm_head weight, never
holding [N, V] logits.

Layering: the backend's row function -> the sweep over chunks (ops/sweep.py: the head's GEMMs
and the row operation per chunk) -> the `pmi_kernels::fused_pmi_kl_rows` custom op and its
autograd (ops/fused.py) -> `fused_pmi_kl` (autocast, FSDP2 head gathering, call preparation,
chunk planning, flattening).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import vocab_parallel
from .call import PreparedCall, prepare
from .heads import frozen_head, gather_heads
from .ops.fused import FusedPMIKL
from .ops.planner import fused_chunk_rows
from .ops.sweep import SweepPlan, logit_buffers
from .reduction import divisor, folds_denominator, stats_dict

Number = Union[float, Tensor]


def _autocast(tensors: Dict[str, Optional[Tensor]]) -> Dict[str, Optional[Tensor]]:
    """The floating tensors in the autocast dtype when autocast is on for their device type.

    Under autocast the head's GEMMs run in the autocast dtype, as F.linear's would (the
    statistics stay fp32); gradients reach the given (e.g. fp32 master) tensors through the
    casts. Autocast is asked only about device types it knows: another (meta) goes on to the
    checks, which refuse it."""
    student = tensors["student_hidden"]
    if not (
        isinstance(student, Tensor)
        and torch.amp.is_autocast_available(student.device.type)
        and torch.is_autocast_enabled(student.device.type)
    ):
        return tensors
    dtype = torch.get_autocast_dtype(student.device.type)
    return {name: x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x for name, x in tensors.items()}


def _chunk_rows(call: PreparedCall, vocab: int, hidden: int, anchor_given: bool) -> int:
    """Rows per chunk; every rank of a vocabulary split sweeps the same chunks, planned for the
    widest shard."""
    if call.group is not None:
        vocab = vocab_parallel.widest_shard(vocab, vocab_parallel.group_of(call.group), call.device)
    buffers = logit_buffers(call.opts, call.dtype, anchor_given)
    return fused_chunk_rows(call.backend, call.device, vocab, hidden, call.dtype, buffers, call.workspace_bytes)


def fused_pmi_kl(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    teacher_hidden: Tensor,
    refonly_hidden: Optional[Tensor] = None,
    anchor_hidden: Optional[Tensor] = None,
    *,
    lm_head_bias: Optional[Tensor] = None,
    frozen_weight: Optional[Tensor] = None,
    frozen_bias: Optional[Tensor] = None,
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
    grad_weight_fp32: bool = False,
    process_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """The PMI-KL loss from final hidden states and the lm_head (docs/loss.md), never holding
    [N, V] logits.

    Args:
        student_hidden: the student's hidden states; takes a gradient when it requires one.
        lm_head_weight, lm_head_bias: the student's head (bias optional); they give the
            student's logits and take gradients when they require them.
        teacher_hidden, refonly_hidden, anchor_hidden: the frozen streams' hidden states, as
            pmi_kl's logit streams (refonly None: standard OPSD; anchor None: the student,
            detached).
        frozen_weight, frozen_bias: the frozen streams' head, each defaulting on its own to the
            student's (detached).
        mask, labels, ignore_index, normalizer, beta, clip, center, temperature, jsd_beta,
            entry_clip, reduction, return_stats, check_finite, backend: as in pmi_kl.
        workspace_bytes: bounds a chunk's logit buffers (default: the CPU's cache, or 1 GiB on
            a GPU).
        grad_weight_fp32: accumulate the weight gradient over chunks in fp32.
        process_group: the vocabulary is split over this torch.distributed group, each rank
            passing its contiguous shard of the lm_head rows (weight, bias, frozen head) in rank
            order (docs/distributed.md); the loss is the whole vocabulary's on every rank, the
            hidden-state gradient is summed over the ranks, the weight and bias gradients are
            this rank's shard's.
    Shapes:
        the hidden states: one shape [..., H], dtype and device; lm_head_weight, frozen_weight:
        [V, H]; lm_head_bias, frozen_bias: [V]; mask, labels: [...].
    Returns:
        As pmi_kl: the loss (0-d, or [...] for reduction="none"), with return_stats (loss, stats).
    A head sharded by FSDP2 (DTensor weight, bias or frozen head) is gathered once per call, its
    gradient averaged and reduce-scattered back as FSDP2 does (docs/distributed.md).
    """
    given = _autocast(
        {
            "student_hidden": student_hidden,
            "lm_head_weight": lm_head_weight,
            "teacher_hidden": teacher_hidden,
            "refonly_hidden": refonly_hidden,
            "anchor_hidden": anchor_hidden,
            "lm_head_bias": lm_head_bias,
            "frozen_weight": frozen_weight,
            "frozen_bias": frozen_bias,
        }
    )
    heads = gather_heads(
        {name: given[name] for name in ("lm_head_weight", "lm_head_bias", "frozen_weight", "frozen_bias")}
    )
    streams = {name: given[name] for name in ("student_hidden", "teacher_hidden", "refonly_hidden", "anchor_hidden")}
    call = prepare(
        streams,
        "H",
        heads=heads,
        beta=beta,
        clip=clip,
        center=center,
        temperature=temperature,
        jsd_beta=jsd_beta,
        entry_clip=entry_clip,
        backend=backend,
        workspace_bytes=workspace_bytes,
        check_finite=check_finite,
        trainable=("student_hidden", "lm_head_weight", "lm_head_bias"),
        reduction=reduction,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        normalizer=normalizer,
        return_stats=return_stats,
        grad_weight_fp32=grad_weight_fp32,
        process_group=process_group,
    )
    weight, bias = heads["lm_head_weight"], heads["lm_head_bias"]
    w_f, b_f = frozen_head(weight, bias, heads["frozen_weight"], heads["frozen_bias"])
    vocab, hidden = weight.shape
    # Without 1/denominator folded in, the weight gradient sums unscaled rows: in fp32, past fp16's range.
    rows_per_chunk = _chunk_rows(call, vocab, hidden, anchor_given=anchor_hidden is not None)
    plan = SweepPlan(
        call.opts, call.backend.name, call.group, rows_per_chunk, grad_weight_fp32 or not folds_denominator(call.dtype)
    )

    def flat(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.reshape(-1, hidden)

    h, h_t, h_r, h_a = (flat(x) for x in streams.values())
    h_t, h_r, h_a = (None if x is None else x.detach() for x in (h_t, h_r, h_a))
    flat_mask = None if call.mask is None else call.mask.reshape(-1)
    denominator = divisor(flat_mask, call.rows, reduction, normalizer, call.compute_dtype, call.device)
    loss, per_row, stats = FusedPMIKL.apply(
        h,
        weight,
        bias,
        h_t,
        h_r,
        h_a,
        w_f,
        b_f,
        flat_mask,
        denominator,
        reduction,
        torch.is_grad_enabled(),
        plan,
        return_stats,
    )
    loss = loss.reshape(call.lead) if reduction == "none" else loss
    return (loss, stats_dict(per_row, stats, call.lead)) if return_stats else loss
