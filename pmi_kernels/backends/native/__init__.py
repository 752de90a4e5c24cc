"""backend="cpu" and backend="cuda": the C++ and CUDA kernels of csrc/, one op schema
(pmi_kernels::rows, pmi_kernels::diagnostics_rows) with a CPU and a CUDA kernel under it;
the dispatcher picks the kernel by the tensors' device. extension.py builds and loads them.
The options travel as the schema's named arguments (LossOptions.op_arguments), the phase as `phase`."""

from __future__ import annotations

from typing import Optional

import torch

from ...options import LossOptions
from ..contract import Phase, check_phase_tensors
from . import extension


def rows(
    s,
    t,
    r=None,
    a=None,
    *,
    opts: LossOptions,
    phase: Phase = Phase.ALL,
    kappa=None,
    mask=None,
    row_scale=None,
    grad_out=None,
    stats_out=None,
    lse_out=None,
    lse_in=None,
    slope_sum_out=None,
    slope_sum_in=None,
) -> torch.Tensor:
    """The row contract (backends/contract.py), every argument passed by its schema name."""
    phase = check_phase_tensors(
        phase, lse_out=lse_out, lse_in=lse_in, slope_sum_out=slope_sum_out, slope_sum_in=slope_sum_in
    )
    extension.load()
    return torch.ops.pmi_kernels.rows(
        student=s,
        teacher=t,
        refonly=r,
        anchor=a,
        kappa=kappa,
        mask=mask,
        row_scale=row_scale,
        grad=grad_out,
        stats=stats_out,
        lse_in=lse_in,
        lse_out=lse_out,
        slope_sum_in=slope_sum_in,
        slope_sum_out=slope_sum_out,
        phase=phase.value,
        **opts.op_arguments(),
    )


def diagnostics_rows(s, t, r, a: Optional[torch.Tensor] = None, *, opts: LossOptions) -> torch.Tensor:
    extension.load()
    return torch.ops.pmi_kernels.diagnostics_rows(student=s, teacher=t, refonly=r, anchor=a, **opts.op_arguments())
