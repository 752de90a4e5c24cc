"""What the custom ops' backward passes share: whether the incoming gradient is the one the
forward already folded in, and an exact rescaling when it is not."""

from __future__ import annotations

import torch
from torch import Tensor


def upstream_matches(grad: Tensor, expected: Tensor) -> bool:
    """Whether the incoming gradient is the one the forward already scaled its gradient for.
    The check syncs with the device, so traced graphs (torch.compile, where the gradient is a
    fake or functional tensor subclass) answer False and always rescale, which is right too."""
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor
    return not traced and torch.equal(grad, expected)


# Rows per slice of scaled(): about 64 MiB of fp32 temporaries.
_SLICE_ENTRIES = 1 << 24


def scaled(x: Tensor, factor: Tensor) -> Tensor:
    """x * factor (a 0-d tensor), each product formed in fp32 (fp64 for fp64) and rounded once to x's
    dtype: factor itself may pass fp16's range (65536), and a bf16 factor (1/3 for gradient
    accumulation) would bias every entry. In slices of about 64 MiB of fp32 outside compile."""
    wide = torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64
    if torch.compiler.is_compiling() or x.dim() == 0 or x.numel() == 0:
        return (x.to(wide) * factor).to(x.dtype)
    out = torch.empty_like(x)
    rows = max(1, _SLICE_ENTRIES // max(1, x[0].numel()))
    for i in range(0, x.shape[0], rows):
        out[i : i + rows] = x[i : i + rows].to(wide) * factor
    return out
