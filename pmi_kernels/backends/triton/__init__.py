"""backend="triton": Triton row kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""

from .diagnostics_kernel import diagnostics_rows
from .row_kernel import rows

__all__ = ["rows", "diagnostics_rows"]
