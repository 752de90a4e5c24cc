"""What the API functions return: the reduced loss (masks, reductions, the normalizer), the
statistics' dict, and the error of a second derivative."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from .backends import STATS


def divisor(mask: Optional[Tensor], rows: int, reduction: str, normalizer, dtype, device) -> Tensor:
    """What the masked sum is divided by, as a tensor (no host sync, so torch.compile traces it):
    the normalizer when given, else max(1, kept rows) for "mean" and 1 otherwise."""
    if normalizer is not None:  # a Python float goes straight to dtype: through fp32 it would lose fp64's digits
        return torch.as_tensor(normalizer, dtype=dtype, device=device)
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if mask is None:
        return torch.tensor(max(1, rows), dtype=dtype, device=device)
    return mask.sum().to(dtype).clamp_min(1)


def folds_denominator(dtype) -> bool:
    """Whether the forward folds 1/denominator (the incoming gradient of an upstream 1) into the
    gradient it stores. Not for fp16, whose range would flush entries (p - q)/N to 0 before a
    loss scaler's factor (GradScaler's 65536) arrives: there the backward applies 1/denominator
    with the upstream gradient, in fp32."""
    return dtype != torch.float16


def forward_grad_scale(denominator: Tensor, dtype) -> Tensor:
    """The per-row scale the forward folds into the gradient it stores (folds_denominator)."""
    return 1 / denominator if folds_denominator(dtype) else torch.ones_like(denominator)


def reduce_rows(per_row: Tensor, denominator: Tensor, reduction: str) -> Tensor:
    """Masked rows are already exactly 0."""
    return per_row if reduction == "none" else per_row.sum() / denominator


def stats_dict(per_row: Tensor, stats: Tensor, lead) -> Dict[str, Tensor]:
    """return_stats' dict: per-position [...] tensors, 0 where masked."""
    return {"loss": per_row.detach().reshape(lead), **{key: stats[:, j].reshape(lead) for j, key in enumerate(STATS)}}


DOUBLE_BACKWARD = (
    "{} has no second derivative: its gradient is computed by its kernels, not by autograd, "
    "so backward(create_graph=True) through it cannot build a graph of the gradient"
)
