"""`pmi_diagnostics`: the paper's decomposition of the teacher's signal, per position.

Computed in row chunks (bounded memory) with the reference arithmetic; a fused Triton
kernel for it is future work (issue 6), so backend must be "auto" or "torch" for now.
"""
from __future__ import annotations

from typing import Dict

import torch

from . import validation
from .backends import DEFAULT_WORKSPACE_BYTES, TORCH_ROW_TEMPORARIES, rows_per_chunk
from .reference import frozen_head, linear_logits, pmi_diagnostics_reference


@torch.no_grad()
def pmi_diagnostics(student, teacher, refonly, anchor=None, *, lm_head_weight=None, lm_head_bias=None,
                    frozen_weight=None, frozen_bias=None, beta=1.0, clip=10.0, center=True,
                    temperature=1.0, check_finite=True, backend="auto",
                    workspace_bytes=DEFAULT_WORKSPACE_BYTES) -> Dict[str, torch.Tensor]:
    """Streams are logits [..., V], or hidden states [..., H] when lm_head_weight is given.

    Returns a dict of per-position tensors (leading shape): cos_total_ref, cos_total_pmi,
    norm_ratio_ref_total, kl_teacher_student, kl_target_student, entropy_student,
    entropy_target (see reference.pmi_diagnostics_reference).
    """
    if refonly is None:
        raise ValueError("refonly is required: the decomposition needs the reference-only stream")
    streams = {"student": student, "teacher": teacher, "refonly": refonly, "anchor": anchor}
    first = validation.check_streams(streams, "H" if lm_head_weight is not None else "V")
    validation.check_choice("backend", backend, ("auto", "torch"))
    if lm_head_weight is not None:
        validation.check_linear(lm_head_weight, lm_head_bias, first, "lm_head_weight", "lm_head_bias")
        w_f, b_f = frozen_head(lm_head_weight, lm_head_bias, frozen_weight, frozen_bias)
    if check_finite:
        validation.check_finite(streams)
    lead, width = first.shape[:-1], first.shape[-1]
    vocab = width if lm_head_weight is None else lm_head_weight.shape[0]
    flat = [None if x is None else x.reshape(-1, width) for x in (student, teacher, refonly, anchor)]
    step = rows_per_chunk(vocab, TORCH_ROW_TEMPORARIES * 8, workspace_bytes)
    parts = []
    # At least one chunk, so an empty input still returns every key.
    for i in range(0, max(1, flat[0].shape[0]), step):
        chunk = [None if x is None else x[i:i + step] for x in flat]
        if lm_head_weight is not None:
            s = linear_logits(chunk[0], lm_head_weight, lm_head_bias)
            chunk = [s] + [None if x is None else linear_logits(x, w_f, b_f) for x in chunk[1:]]
        parts.append(pmi_diagnostics_reference(*chunk, beta=beta, clip=clip, center=center,
                                               temperature=temperature))
    return {k: torch.cat([p[k] for p in parts]).reshape(lead) for k in parts[0]}
