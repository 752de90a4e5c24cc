"""backend="torch": the row operation in plain torch ops, over chunks of rows (any device)."""

from .diagnostics_op import diagnostics_rows
from .row_op import rows

__all__ = ["rows", "diagnostics_rows"]
