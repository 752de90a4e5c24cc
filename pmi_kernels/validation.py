"""Input checks that every path runs first, so bad input fails the same way everywhere.

Each failure is a ValueError that names the argument (and the stream, for non-finite
values), raised before any kernel runs.
"""

from __future__ import annotations

import numbers
from typing import Dict, Optional

import torch

from .options import LARGEST, REDUCTIONS, SMALLEST, check_number, is_number_tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_reduction(reduction) -> None:
    check_choice("reduction", reduction, REDUCTIONS)


# The custom ops carry workspace_bytes as an int64.
LARGEST_WORKSPACE = 2**63 - 1


def check_workspace(workspace_bytes) -> None:
    if workspace_bytes is None:
        return
    if (
        isinstance(workspace_bytes, bool)
        or not isinstance(workspace_bytes, int)
        or not 0 < workspace_bytes <= LARGEST_WORKSPACE
    ):
        raise ValueError(f"workspace_bytes must be an integer in [1, 2**63 - 1] (bytes), got {workspace_bytes!r}")


def check_dense(name: str, x: torch.Tensor) -> None:
    """A strided (dense) tensor: neither the kernels nor the finite check take sparse layouts."""
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def check_streams(streams: Dict[str, Optional[torch.Tensor]], what: str, required: int = 2) -> torch.Tensor:
    """All given streams: tensors of one float dtype, one device, one shape [..., D], D > 0.

    `streams` maps argument names to tensors (None = stream absent); the first `required`
    (the student and the teacher) must be given; the first is the student, against which the
    others are compared. Returns the student.
    """
    first_name, first = next(iter(streams.items()))
    for index, (name, x) in enumerate(streams.items()):
        if x is None and index < required:
            raise ValueError(f"{name} is required, got None")
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_dense(name, x)
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have a non-empty last dimension ({what}), got shape {tuple(x.shape)}")
        if x is first:
            continue
        if x.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {first_name} has {tuple(first.shape)}")
        if x.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}")
    return first


def check_bool(name: str, value) -> None:
    """A flag: True or False, never a truthy stand-in ("no" would switch it on)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")


def counted_positions(mask, labels, ignore_index, lead_shape, device) -> Optional[torch.Tensor]:
    """The positions that count, as a bool tensor of the streams' leading shape (None: all):
    `mask` (bool, or 0/1 integers), or `labels != ignore_index` (Liger's and TRL's convention)."""
    if mask is not None and labels is not None:
        raise ValueError("mask and labels both given: pass one (labels count where labels != ignore_index)")
    check_ignore_index(ignore_index)
    name, x = ("labels", labels) if labels is not None else ("mask", mask)
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of the streams' leading shape, got {type(x).__name__}")
    check_dense(name, x)
    if tuple(x.shape) != tuple(lead_shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but the streams' leading shape is {tuple(lead_shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the streams are on {device}")
    integer = not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    if labels is not None:
        if not integer:
            raise ValueError(f"labels must be an integer tensor (token ids), got {x.dtype}")
        return x != ignore_index
    if x.dtype == torch.bool:
        return x
    if not integer:
        raise ValueError(f"mask must be bool or 0/1 integers (True/1 = the position counts), got {x.dtype}")
    # A value check reads back to the host: traced graphs (torch.compile) skip it.
    if not torch.compiler.is_compiling() and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError("mask must hold only 0 and 1 (or be bool); for other values pass labels= or mask != 0")
    return x != 0


def check_normalizer(normalizer, reduction: str) -> None:
    """normalizer (a number or a 0-d tensor, in the options' range) divides the masked sum, in place
    of the mean's count."""
    if normalizer is None:
        return
    if reduction == "none":
        raise ValueError("normalizer divides a reduced loss: it cannot be used with reduction='none'")
    if is_number_tensor(normalizer) and torch.compiler.is_compiling():
        return  # a traced tensor's value cannot be read
    check_number("normalizer", normalizer, SMALLEST, LARGEST)


def check_linear(weight, bias, hidden: torch.Tensor, weight_name: str, bias_name: str) -> None:
    """An lm_head weight [V, H] (and optional bias [V]) matching the hidden states [..., H]."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{weight_name} must be a 2-D tensor [V, H], got {got}")
    check_dense(weight_name, weight)
    vocab, hidden_size = weight.shape
    if vocab == 0 or hidden_size == 0:
        raise ValueError(f"{weight_name} must have V > 0 and H > 0, got shape {tuple(weight.shape)}")
    if hidden_size != hidden.shape[-1]:
        raise ValueError(f"{weight_name} has H = {hidden_size} but the hidden states have H = {hidden.shape[-1]}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{weight_name} has dtype {weight.dtype} but the hidden states have {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{weight_name} is on {weight.device} but the hidden states are on {hidden.device}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{bias_name} must be a tensor of shape [{vocab}], got {got}")
    check_dense(bias_name, bias)
    if bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(f"{bias_name} must match {weight_name} in dtype and device")


def check_frozen_head(frozen_weight, frozen_bias, weight, bias, hidden: torch.Tensor) -> None:
    """The frozen streams' head: frozen_weight and frozen_bias each default on their own to the
    student's (weight, bias), already checked. Run before heads.frozen_head(), which would
    fail on a non-tensor with a raw AttributeError."""
    w_f = weight if frozen_weight is None else frozen_weight
    check_linear(w_f, bias if frozen_bias is None else frozen_bias, hidden, "frozen_weight", "frozen_bias")
    if w_f.shape[0] != weight.shape[0]:
        raise ValueError(f"frozen_weight has V = {w_f.shape[0]} but lm_head_weight has V = {weight.shape[0]}")


def check_finite(streams: Dict[str, Optional[torch.Tensor]]) -> None:
    """One fused reduction per stream; this syncs with the device, hence the opt-out."""
    for name, x in streams.items():
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
