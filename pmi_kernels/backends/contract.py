"""The row contract every backend keeps: what `rows` and `diagnostics_rows` take and give.

A backend is a module with these two functions (RowBackend states them); the plain_torch
package is the readable example, and the contract suite (tests/test_backends.py) runs every
registered backend against reference.py.
"""

from __future__ import annotations

import enum
from typing import Optional, Protocol

import torch

from ..options import LossOptions


class Phase(enum.IntEnum):
    """Which passes of the row operation run: csrc/include/rows_args.h's `Phase`, same numbers.

    ALL runs the whole operation on whole rows. A vocabulary split between processes
    (vocab_parallel.parallel_rows) runs the other three, gathering between them: LSE writes this
    shard's (max, sum of exp) of s and of the target g; FROM_LSE, from the whole vocabulary's
    (max, log sum of exp), this shard's loss, statistics and slope sum (and forward KL's
    gradient); GRAD, from the whole slope sum, only the gradient.
    """

    ALL = 0
    LSE = 1
    FROM_LSE = 2
    GRAD = 3


# The phases' tensors each phase reads or writes; it takes none of the others.
PHASE_TENSORS = {
    Phase.ALL: (),
    Phase.LSE: ("lse_out",),
    Phase.FROM_LSE: ("lse_in", "slope_sum_out"),
    Phase.GRAD: ("lse_in", "slope_sum_in"),
}


def check_phase_tensors(phase: Phase, **tensors: Optional[torch.Tensor]) -> Phase:
    """`phase` as a Phase, when exactly its PHASE_TENSORS of `tensors` (lse_in, lse_out,
    slope_sum_in, slope_sum_out) are given; else a ValueError naming the one that is not."""
    if phase not in PHASE_TENSORS:
        raise ValueError(f"phase must be one of {[p.value for p in Phase]} (backends.contract.Phase), got {phase!r}")
    phase = Phase(phase)
    for name, tensor in tensors.items():
        wanted = name in PHASE_TENSORS[phase]
        if (tensor is not None) != wanted:
            raise ValueError(f"phase {phase.name} {'needs' if wanted else 'takes no'} {name}")
    return phase


class RowBackend(Protocol):
    """The two functions of a backend module, over raw logit rows [C, V] (unit stride along V):
    student s, teacher t, reference-only r (None in standard OPSD mode, or where t already holds
    t - r), anchor a (None: the target is built on s). A backend may take more keyword arguments
    with defaults (the Triton launcher's tile width)."""

    def rows(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        r: Optional[torch.Tensor] = None,
        a: Optional[torch.Tensor] = None,
        *,
        opts: LossOptions,
        phase: Phase = Phase.ALL,
        kappa: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        row_scale: Optional[torch.Tensor] = None,
        grad_out: Optional[torch.Tensor] = None,
        stats_out: Optional[torch.Tensor] = None,
        lse_out: Optional[torch.Tensor] = None,
        lse_in: Optional[torch.Tensor] = None,
        slope_sum_out: Optional[torch.Tensor] = None,
        slope_sum_in: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-row loss [C] in the compute dtype (options.compute_dtype), 0 where `mask` is False.

        kappa [C]: the per-row shift of t - r under the soft clip, when the caller has it (the
        fused path's GEMM, a vocabulary split); else the backend computes it. When grad_out is
        given, row_scale * dloss/ds_raw is written into it (it may alias s; masked rows zero);
        when stats_out [C, 3] is given, KL(q||p), H(p) and H(q) per row (backends.STATS).

        `phase` (Phase) runs part of the operation over one shard of a split vocabulary, with
        exactly the phase's tensors (PHASE_TENSORS): lse_out [C, 4] receives this shard's (max,
        sum of exp) of s and g (loss 0); from lse_in [C, 4], the whole vocabulary's (max, log
        sum of exp) of s and g, the loss, statistics and slope_sum_out [C] are this shard's
        partial sums, and forward KL's gradient is written; from lse_in and slope_sum_in [C]
        too, only the gradient is written (loss 0).
        """
        ...

    def diagnostics_rows(
        self, s: torch.Tensor, t: torch.Tensor, r: torch.Tensor, a: Optional[torch.Tensor] = None, *, opts: LossOptions
    ) -> torch.Tensor:
        """[C, len(backends.DIAGNOSTICS)] in the compute dtype: the decomposition of the
        teacher's signal per row (cosines of a zero vector are 0)."""
        ...
