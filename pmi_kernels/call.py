"""One call's preparation, shared by pmi_kl, fused_pmi_kl and pmi_diagnostics: every argument
checked by name, the loss options built, the backend resolved, the finite check, and the
fields the ranks of a vocabulary split compare (vocab_parallel.call_fingerprint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import validation, vocab_parallel
from .backends import Backend, resolve_backend
from .options import LossOptions, compute_dtype


@dataclass(frozen=True)
class PreparedCall:
    """A call whose arguments passed their checks.

    Args:
        shape: the student stream's shape [..., D] (D: V for logits, H for hidden states).
        width: "V" (the streams are logits: D is this rank's vocabulary shard) or "H".
        dtype, device: the streams'.
        given: the names of the optional tensors given (streams, heads).
        opts: the loss options.
        backend: the backend that runs.
        mask: the positions that count, bool [...] (None: all).
        reduction, normalizer: as given (None for pmi_diagnostics, which does not reduce).
        workspace_bytes, return_stats, check_finite, grad_weight_fp32: as given.
        gradient: per trainable argument (the student, and the head for fused_pmi_kl), whether
            its gradient is computed in this call.
        group: the name of the process group the vocabulary is split over, or None.
    """

    shape: Tuple[int, ...]
    width: str
    dtype: torch.dtype
    device: torch.device
    given: Tuple[str, ...]
    opts: LossOptions
    backend: Backend
    mask: Optional[Tensor]
    reduction: Optional[str]
    normalizer: object
    workspace_bytes: Optional[int]
    return_stats: bool
    check_finite: bool
    grad_weight_fp32: bool
    gradient: Tuple[bool, ...]
    group: Optional[str]

    @property
    def lead(self) -> Tuple[int, ...]:
        """The leading shape [...] of the streams: one position per row."""
        return self.shape[:-1]

    @property
    def rows(self) -> int:
        return math.prod(self.lead)

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.dtype)


def prepare(
    streams: Dict[str, Optional[Tensor]],
    width: str,
    *,
    beta,
    clip,
    center,
    temperature,
    jsd_beta=0.5,
    entry_clip=None,
    backend: str,
    workspace_bytes,
    check_finite,
    heads: Optional[Dict[str, Optional[Tensor]]] = None,
    trainable: Sequence[str] = (),
    reduction: Optional[str] = None,
    mask=None,
    labels=None,
    ignore_index=-100,
    normalizer=None,
    return_stats=None,
    grad_weight_fp32=None,
    process_group=None,
) -> PreparedCall:
    """Checks one call's arguments, each by name, and prepares it.

    Args:
        streams: the four streams by argument name, in the order student, teacher, refonly,
            anchor (None: absent); the student and the teacher are required, the refonly
            stream's presence is the loss options' `pmi`.
        width: "V" when the streams are logits, "H" when they are hidden states.
        beta, clip, center, temperature, jsd_beta, entry_clip: the loss options.
        backend, workspace_bytes, check_finite: as the public functions take them.
        heads: lm_head_weight, lm_head_bias, frozen_weight, frozen_bias by name (already gathered
            whole); None for pmi_kl. With logit streams, no head may be given.
        trainable: the names of the tensors that may take a gradient (PreparedCall.gradient).
        reduction: "mean", "sum" or "none"; None for a call that does not reduce (no mask,
            labels or normalizer then).
        mask, labels, ignore_index, normalizer: as the public functions take them.
        return_stats, grad_weight_fp32: checked when given (None: the function does not take it).
        process_group: the vocabulary split; when given, every rank's checks are settled
            together (vocab_parallel.Agreement) and the ranks must agree on the prepared fields.
    Returns:
        The PreparedCall. A bad argument is a ValueError naming it.
    """
    group = vocab_parallel.group_name(process_group)
    with vocab_parallel.Agreement(group) as agreement:
        student = validation.check_streams(streams, width)
        heads = heads or {}
        _check_heads(heads, student, width)
        lead = student.shape[:-1]
        counted = None
        if reduction is not None:
            counted = validation.counted_positions(mask, labels, ignore_index, lead, student.device)
            validation.check_reduction(reduction)
            validation.check_normalizer(normalizer, reduction)
        validation.check_workspace(workspace_bytes)
        flags = {"return_stats": return_stats, "check_finite": check_finite, "grad_weight_fp32": grad_weight_fp32}
        for name, flag in flags.items():
            if flag is not None:  # None: a flag the function does not take
                validation.check_bool(name, flag)
        refonly = list(streams.values())[2]
        opts = LossOptions(
            pmi=refonly is not None,
            beta=beta,
            clip=clip,
            center=center,
            temperature=temperature,
            jsd_beta=jsd_beta,
            entry_clip=entry_clip,
        )
        impl = resolve_backend(backend, student.device)
        tensors = {**streams, **heads}
        if check_finite:
            validation.check_finite(tensors)
        call = PreparedCall(
            shape=tuple(student.shape),
            width=width,
            dtype=student.dtype,
            device=student.device,
            given=tuple(name for name, x in tensors.items() if x is not None),
            opts=opts,
            backend=impl,
            mask=counted,
            reduction=reduction,
            normalizer=normalizer,
            workspace_bytes=workspace_bytes,
            return_stats=bool(return_stats),
            check_finite=check_finite,
            grad_weight_fp32=bool(grad_weight_fp32),
            gradient=tuple(
                torch.is_grad_enabled() and tensors[name] is not None and tensors[name].requires_grad
                for name in trainable
            ),
            group=group,
        )
        if group is not None:  # chunks, the phases' collectives and the gradient's all-reduce run alike
            agreement.fingerprint = vocab_parallel.call_fingerprint(call)
    return call


def _check_heads(heads: Dict[str, Optional[Tensor]], student: Tensor, width: str) -> None:
    """The lm_head and the frozen head (hidden-state streams), or none at all (logit streams)."""
    if not heads:
        return
    if width == "V":
        # Without lm_head_weight the streams are logits: a head argument would be silently ignored.
        for name, x in heads.items():
            if x is not None:
                raise ValueError(f"{name} needs lm_head_weight (without it the streams are logits)")
        return
    weight, bias = heads["lm_head_weight"], heads["lm_head_bias"]
    validation.check_linear(weight, bias, student, "lm_head_weight", "lm_head_bias")
    validation.check_frozen_head(heads["frozen_weight"], heads["frozen_bias"], weight, bias, student)
