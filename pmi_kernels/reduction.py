"""How per-row losses become the returned loss: masks, reductions, and the per-row gradient
scale the forward folds into the gradient it computes ahead of the backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def kept_rows(mask: Optional[Tensor], rows: int, dtype, device) -> Tensor:
    """max(1, number of kept rows), as a tensor (no host sync, so torch.compile traces it)."""
    if mask is None:
        return torch.tensor(max(1, rows), dtype=dtype, device=device)
    return mask.sum().to(dtype).clamp_min(1)


def upstream_scale(count: Tensor, reduction: str) -> Tensor:
    """What the reduction sends back to each row for an upstream gradient of 1."""
    return count.new_ones(()) / count if reduction == "mean" else count.new_ones(())


def reduce_rows(per_row: Tensor, count: Tensor, reduction: str) -> Tensor:
    """Masked rows are already exactly 0; the mean divides by max(1, count of kept rows)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / count
