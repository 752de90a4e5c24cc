"""The chunk planner: how many rows of [C, V] logits one chunk takes, from a workspace budget.

Every path sweeps its rows in chunks so that no [N, V] tensor exists: the chunk's own logit
buffers plus the backend's temporaries (Backend.row_temporaries) fit the workspace.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import Backend
from ..options import compute_dtype

DEFAULT_WORKSPACE_BYTES = 1 << 30
# Chunks of rows on CPU tensors, sized for the cache. On the 2-core CI machine (2026-11-26)
# the torch row operation ran pmi_kl forward + backward 4-5x faster with 8 MiB than with
# 1 GiB at V = 8k-152k.
CPU_WORKSPACE_BYTES = 8 << 20

# The fused path's chunks, sized for the CPU's cache, re-read the [V, H] weights once per chunk:
# a chunk takes at least H / HIDDEN_PER_MINIMUM_ROW rows, so that the GEMMs do enough work per
# read of the weights (on 2 CPU cores 2-3x faster than 1 GiB chunks at H <= 256).
HIDDEN_PER_MINIMUM_ROW = 4


def default_workspace_bytes(device: torch.device) -> int:
    """The workspace when workspace_bytes is None: the CPU's cache, or 1 GiB on a GPU."""
    return CPU_WORKSPACE_BYTES if device.type == "cpu" else DEFAULT_WORKSPACE_BYTES


def chunk_rows(
    backend: Backend,
    device: torch.device,
    vocab: int,
    buffer_bytes_per_entry: int,
    compute_itemsize: int,
    workspace_bytes: Optional[int] = None,
    min_rows: int = 1,
) -> int:
    """Rows per chunk: the chunk's own buffers (`buffer_bytes_per_entry` per vocabulary entry of
    a row) plus the backend's temporaries fit `workspace_bytes`. By default they fit the CPU's
    cache (at least `min_rows`, at most what 1 GiB holds), or 1 GiB on a GPU."""
    per_row = vocab * (buffer_bytes_per_entry + backend.row_temporaries * compute_itemsize)
    if workspace_bytes is not None:
        return max(1, workspace_bytes // per_row)
    rows = max(min_rows, default_workspace_bytes(device) // per_row)
    return max(1, min(rows, DEFAULT_WORKSPACE_BYTES // per_row))


def fused_chunk_rows(
    backend: Backend,
    device: torch.device,
    vocab: int,
    hidden: int,
    dtype: torch.dtype,
    logit_buffers: int,
    workspace_bytes: Optional[int],
) -> int:
    """Rows per chunk of the fused path: `logit_buffers` [C, V] buffers in the input dtype (the
    student's logits and each frozen stream the sweep computes), at least
    hidden // HIDDEN_PER_MINIMUM_ROW rows under the default workspace."""
    return chunk_rows(
        backend,
        device,
        vocab,
        logit_buffers * dtype.itemsize,
        compute_dtype(dtype).itemsize,
        workspace_bytes,
        min_rows=hidden // HIDDEN_PER_MINIMUM_ROW,
    )


def logits_chunk_rows(
    backend: Backend, device: torch.device, rows: int, vocab: int, dtype: torch.dtype, workspace_bytes: Optional[int]
) -> int:
    """Rows per chunk of pmi_kl's `rows` rows: the logits are given, so only the backend's
    temporaries count; a backend without any (streams_rows) takes every row at once."""
    if backend.streams_rows:
        return rows
    return chunk_rows(backend, device, vocab, 0, compute_dtype(dtype).itemsize, workspace_bytes)
