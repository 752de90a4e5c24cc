"""`pmi_diagnostics`: the paper's decomposition of the teacher's signal, per position.

Rows go in chunks (bounded memory). On CUDA (and under TRITON_INTERPRET=1) a Triton kernel
reads each row twice and keeps only raw sums (triton_diagnostics.py); backend="torch" runs
the reference arithmetic on each chunk.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from . import validation
from .backends import DEFAULT_WORKSPACE_BYTES, TORCH_ROW_TEMPORARIES, resolve_backend, rows_per_chunk
from .options import LossOptions
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
    validation.check_choice("backend", backend, ("auto", "triton", "torch"))
    opts = LossOptions(True, beta, clip, center, temperature)
    backend = resolve_backend(backend, first.device)
    head = {"lm_head_weight": lm_head_weight, "lm_head_bias": lm_head_bias, "frozen_weight": frozen_weight,
            "frozen_bias": frozen_bias}
    w_f = b_f = None
    if lm_head_weight is not None:
        validation.check_linear(lm_head_weight, lm_head_bias, first, "lm_head_weight", "lm_head_bias")
        validation.check_frozen_head(frozen_weight, frozen_bias, lm_head_weight, lm_head_bias, first)
        w_f, b_f = frozen_head(lm_head_weight, lm_head_bias, frozen_weight, frozen_bias)
    else:
        # Without lm_head_weight the streams are logits: a head argument would be silently ignored.
        for name, x in head.items():
            if x is not None:
                raise ValueError(f"{name} needs lm_head_weight (without it the streams are logits)")
    if check_finite:
        validation.check_finite({**streams, **head})
    lead, width = first.shape[:-1], first.shape[-1]
    vocab = width if lm_head_weight is None else lm_head_weight.shape[0]
    flat = [None if x is None else x.reshape(-1, width) for x in (student, teacher, refonly, anchor)]
    if backend == "triton":
        from .triton_diagnostics import DIAGNOSTICS, diagnostics_rows_triton
        step = rows_per_chunk(vocab, 4 * first.element_size(), workspace_bytes)

        def logits(x, w, b):  # GEMM outputs in the input dtype, as in fused_pmi_kl
            return None if x is None else (x if w is None else F.linear(x, w, b)).contiguous()

        def diagnose(s, t, r, a):
            table = diagnostics_rows_triton(s, t, r, a, opts=opts)
            return {k: table[:, j] for j, k in enumerate(DIAGNOSTICS)}
    else:
        step = rows_per_chunk(vocab, TORCH_ROW_TEMPORARIES * 8, workspace_bytes)

        def logits(x, w, b):  # upcast, as the reference computes
            return None if x is None else (x if w is None else linear_logits(x, w, b))

        def diagnose(s, t, r, a):
            return pmi_diagnostics_reference(s, t, r, a, beta=beta, clip=clip, center=center,
                                             temperature=temperature)
    parts = []
    # At least one chunk, so an empty input still returns every key.
    for i in range(0, max(1, flat[0].shape[0]), step):
        s, t, r, a = (None if x is None else x[i:i + step] for x in flat)
        parts.append(diagnose(logits(s, lm_head_weight, lm_head_bias), logits(t, w_f, b_f),
                              logits(r, w_f, b_f), logits(a, w_f, b_f)))
    return {k: torch.cat([p[k] for p in parts]).reshape(lead) for k in parts[0]}
