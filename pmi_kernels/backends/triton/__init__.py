"""backend="triton": Triton row kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""
from .diagnostics import diagnostics_rows
from .rows import rows

__all__ = ["rows", "diagnostics_rows"]
