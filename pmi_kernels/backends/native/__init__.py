"""backend="cpu" and backend="cuda": the C++ and CUDA kernels of csrc/, one op schema
(pmi_kernels::rows, pmi_kernels::diagnostics_rows) with a CPU and a CUDA kernel under it;
the dispatcher picks the kernel by the tensors' device. extension.py builds and loads them."""
from __future__ import annotations

import torch

from ...options import LossOptions
from . import extension


def rows(s, t, r=None, a=None, *, opts: LossOptions, kappa=None, mask=None, row_scale=None, grad_out=None,
         stats_out=None, lse_out=None, lse_in=None, slope_sum_out=None, slope_sum_in=None) -> torch.Tensor:
    extension.load()
    return torch.ops.pmi_kernels.rows(s, t, r, a, kappa, mask, row_scale, grad_out, stats_out, lse_in, lse_out,
                                      slope_sum_in, slope_sum_out, opts.pack())


def diagnostics_rows(s, t, r, a=None, *, opts: LossOptions) -> torch.Tensor:
    extension.load()
    return torch.ops.pmi_kernels.diagnostics_rows(s, t, r, a, opts.pack())
