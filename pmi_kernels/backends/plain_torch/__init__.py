"""backend="torch": the row operation in plain torch ops, over chunks of rows (any device)."""
from .diagnostics import diagnostics_rows
from .rows import rows

__all__ = ["rows", "diagnostics_rows"]
