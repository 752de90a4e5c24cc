"""How per-row losses become the returned loss: masks, reductions, the normalizer, and the
per-row gradient scale the forward folds into the gradient it computes ahead of the backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def divisor(mask: Optional[Tensor], rows: int, reduction: str, normalizer, dtype, device) -> Tensor:
    """What the masked sum is divided by, as a tensor (no host sync, so torch.compile traces it):
    the normalizer when given, else max(1, kept rows) for "mean" and 1 otherwise."""
    if normalizer is not None:
        return torch.as_tensor(normalizer, device=device).to(dtype)
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if mask is None:
        return torch.tensor(max(1, rows), dtype=dtype, device=device)
    return mask.sum().to(dtype).clamp_min(1)


def reduce_rows(per_row: Tensor, denominator: Tensor, reduction: str) -> Tensor:
    """Masked rows are already exactly 0."""
    return per_row if reduction == "none" else per_row.sum() / denominator
