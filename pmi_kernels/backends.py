"""Picking the path that computes the row operation, and sizing row chunks."""
from __future__ import annotations

import os

import torch

# The torch row operation keeps about a dozen compute-dtype [C, V] temporaries alive.
TORCH_ROW_TEMPORARIES = 12
DEFAULT_WORKSPACE_BYTES = 1 << 30
# The torch row operation on CPU: chunks whose temporaries stay in cache. On the 2-core CI
# machine (2026-11-26) pmi_kl forward + backward ran 4-5x faster with 8 MiB than with 1 GiB
# at V = 8k-152k.
CPU_WORKSPACE_BYTES = 8 << 20


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "cuda":
        raise ValueError("backend='cuda': the csrc/ CUDA kernels are not part of this build yet; "
                         "use backend='triton' (or 'auto') on CUDA tensors")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors runs only under TRITON_INTERPRET=1 "
                         "(set before pmi_kernels is imported)")
    return backend


def row_function(backend: str):
    """The row operation: (s, t, r, a, *, opts, kappa, mask, row_scale, grad_out) -> loss."""
    if backend == "triton":
        from .triton_rows import rows_loss_and_grad_triton
        return rows_loss_and_grad_triton
    from .rows_torch import rows_loss_and_grad
    return rows_loss_and_grad


def cache_sized_chunks(backend: str, device: torch.device) -> bool:
    """Whether the default chunks are sized for the CPU's cache rather than the 1 GiB budget."""
    return backend == "torch" and device.type == "cpu"


def default_workspace_bytes(backend: str, device: torch.device) -> int:
    return CPU_WORKSPACE_BYTES if cache_sized_chunks(backend, device) else DEFAULT_WORKSPACE_BYTES


def rows_per_chunk(vocab: int, bytes_per_row_entry: int, workspace_bytes) -> int:
    """How many rows of `bytes_per_row_entry` bytes per vocabulary entry fit the workspace."""
    budget = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else int(workspace_bytes)
    if budget <= 0:
        raise ValueError(f"workspace_bytes must be > 0, got {workspace_bytes!r}")
    return max(1, budget // (vocab * bytes_per_row_entry))


def upstream_matches(grad: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether the incoming gradient is the one the forward already scaled its gradient for.
    The check syncs with the device, so traced graphs (torch.compile, where the gradient is a
    fake or functional tensor subclass) answer False and always rescale, which is right too."""
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor
    return not traced and torch.equal(grad, expected)
