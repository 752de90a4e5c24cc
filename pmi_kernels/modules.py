"""The losses as modules, in the style of Liger's: options in the constructor, tensors in forward.

    loss_fn = FusedPMIKLLoss(beta=1.0, clip=10.0, jsd_beta=0.0)
    loss = loss_fn(h_student, model.lm_head.weight, h_teacher, h_refonly, labels=labels)

forward takes the function's tensors (and per-call mask, labels, normalizer) and returns what
the function returns.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import validation, vocab_parallel
from .backends import BACKENDS
from .fused_linear import fused_pmi_kl
from .logits import pmi_kl
from .options import LossOptions

# Given with each batch, not fixed at construction.
PER_CALL = ("mask", "labels", "normalizer")
LOSS_OPTIONS = ("beta", "clip", "center", "temperature", "jsd_beta", "entry_clip")
# What the functions return: the loss, or (loss, statistics) with return_stats=True.
Loss = Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]


def _check(options: Dict[str, Any]) -> None:
    """The options' values, checked at construction as the function checks them per call."""
    LossOptions(pmi=True, **{k: v for k, v in options.items() if k in LOSS_OPTIONS})
    validation.check_reduction(options.get("reduction", "mean"))
    validation.check_workspace(options.get("workspace_bytes"))
    validation.check_choice("backend", options.get("backend", "auto"), BACKENDS)
    for name in ("return_stats", "check_finite", "grad_weight_fp32"):
        validation.check_bool(name, options.get(name, False))
    validation.check_ignore_index(options.get("ignore_index", -100))
    vocab_parallel.group_name(options.get("process_group"))  # a ProcessGroup, of an initialized group


class _OptionsLoss(torch.nn.Module):
    """A loss function as a module: its keyword-only options fixed at construction."""

    function: Callable[..., Any]
    tensors: Tuple[str, ...] = ()  # the function's tensor keywords that forward also takes

    def __init__(self, **options: Any):
        """
        Args:
            **options: the function's keyword-only arguments except the per-call ones (mask,
                labels, normalizer) and the tensors forward takes; checked here as the
                function would check them.
        """
        super().__init__()
        allowed = [
            name
            for name, p in inspect.signature(self.function).parameters.items()
            if p.kind == p.KEYWORD_ONLY and name not in PER_CALL + self.tensors
        ]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown options {unknown}; options are {allowed} "
                f"({', '.join(PER_CALL)} go to forward)"
            )
        _check(options)
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class PMIKLLoss(_OptionsLoss):
    """pmi_kl as a module: PMIKLLoss(**options)(student_logits, teacher_logits, refonly_logits=None,
    anchor_logits=None, *, mask=None, labels=None, normalizer=None)."""

    function = staticmethod(pmi_kl)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        refonly_logits: Optional[Tensor] = None,
        anchor_logits: Optional[Tensor] = None,
        **per_call: Any,
    ) -> Loss:
        """pmi_kl with the constructor's options.

        Args:
            student_logits, teacher_logits, refonly_logits, anchor_logits: as in pmi_kl.
            **per_call: mask, labels, normalizer (as in pmi_kl).
        Shapes:
            as in pmi_kl: the streams [..., V], mask and labels [...].
        Returns:
            What pmi_kl returns.
        """
        return pmi_kl(student_logits, teacher_logits, refonly_logits, anchor_logits, **self._call(per_call))

    def _call(self, per_call: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(per_call) - set(PER_CALL + self.tensors))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.forward: unknown arguments {unknown}; it takes the tensors "
                f"and {', '.join(PER_CALL + self.tensors)} (options go to the constructor)"
            )
        return {**self.options, **per_call}


class FusedPMIKLLoss(PMIKLLoss):
    """fused_pmi_kl as a module: FusedPMIKLLoss(**options)(student_hidden, lm_head_weight,
    teacher_hidden, refonly_hidden=None, anchor_hidden=None, *, lm_head_bias=None,
    frozen_weight=None, frozen_bias=None, mask=None, labels=None, normalizer=None)."""

    function = staticmethod(fused_pmi_kl)
    tensors = ("lm_head_bias", "frozen_weight", "frozen_bias")

    def forward(
        self,
        student_hidden: Tensor,
        lm_head_weight: Tensor,
        teacher_hidden: Tensor,
        refonly_hidden: Optional[Tensor] = None,
        anchor_hidden: Optional[Tensor] = None,
        **per_call: Any,
    ) -> Loss:
        """fused_pmi_kl with the constructor's options.

        Args:
            student_hidden, lm_head_weight, teacher_hidden, refonly_hidden, anchor_hidden: as
                in fused_pmi_kl.
            **per_call: lm_head_bias, frozen_weight, frozen_bias, mask, labels, normalizer (as
                in fused_pmi_kl).
        Shapes:
            as in fused_pmi_kl: the hidden states [..., H], the heads [V, H] and [V].
        Returns:
            What fused_pmi_kl returns.
        """
        return fused_pmi_kl(
            student_hidden, lm_head_weight, teacher_hidden, refonly_hidden, anchor_hidden, **self._call(per_call)
        )
