"""`pmi_diagnostics`: the paper's decomposition of the teacher's signal, per position.

Rows go in chunks (bounded memory); each chunk's logits (given, or the head's GEMM outputs in
the input dtype, as in fused_pmi_kl) go through the backend's diagnostics row function.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from . import validation
from .backends import DIAGNOSTICS, chunk_rows, resolve_backend
from .heads import frozen_head, gather_heads
from .options import LossOptions, compute_dtype


@torch.no_grad()
def pmi_diagnostics(student, teacher, refonly, anchor=None, *, lm_head_weight=None, lm_head_bias=None,
                    frozen_weight=None, frozen_bias=None, beta=1.0, clip=10.0, center=True,
                    temperature=1.0, check_finite=True, backend="auto",
                    workspace_bytes=None) -> Dict[str, torch.Tensor]:
    """Streams are logits [..., V], or hidden states [..., H] when lm_head_weight is given.

    Returns a dict of per-position tensors (leading shape), in the compute dtype:
    cos_total_ref = cos(Δ_total, Δ_ref), cos_total_pmi = cos(Δ_total, Δ_it),
    norm_ratio_ref_total = |Δ_ref| / |Δ_total|, kl_teacher_student = KL(p_T || p_S),
    kl_target_student = KL(q || p_S), entropy_student = H(p_S), entropy_target = H(q), with
    Δ_total = log p_T - log p_S, Δ_ref = log p_R - log p_S, Δ_it = log p_T - log p_R
    (docs/loss.md). The frozen head defaults as in fused_pmi_kl; workspace_bytes bounds a
    chunk's logits (default: the CPU's cache, or 1 GiB on a GPU).
    """
    if refonly is None:
        raise ValueError("refonly is required: the decomposition needs the reference-only stream")
    heads = gather_heads({"lm_head_weight": lm_head_weight, "lm_head_bias": lm_head_bias,
                          "frozen_weight": frozen_weight, "frozen_bias": frozen_bias})
    lm_head_weight, lm_head_bias, frozen_weight, frozen_bias = heads.values()
    streams = {"student": student, "teacher": teacher, "refonly": refonly, "anchor": anchor}
    first = validation.check_streams(streams, "H" if lm_head_weight is not None else "V")
    validation.check_workspace(workspace_bytes)
    validation.check_bool("check_finite", check_finite)
    opts = LossOptions(pmi=True, beta=beta, clip=clip, center=center, temperature=temperature)
    head = {"lm_head_weight": lm_head_weight, "lm_head_bias": lm_head_bias, "frozen_weight": frozen_weight,
            "frozen_bias": frozen_bias}
    if lm_head_weight is not None:
        validation.check_linear(lm_head_weight, lm_head_bias, first, "lm_head_weight", "lm_head_bias")
        validation.check_frozen_head(frozen_weight, frozen_bias, lm_head_weight, lm_head_bias, first)
        w_f, b_f = frozen_head(lm_head_weight, lm_head_bias, frozen_weight, frozen_bias)
    else:
        # Without lm_head_weight the streams are logits: a head argument would be silently ignored.
        for name, x in head.items():
            if x is not None:
                raise ValueError(f"{name} needs lm_head_weight (without it the streams are logits)")
    impl = resolve_backend(backend, first.device)
    if check_finite:
        validation.check_finite({**streams, **head})
    lead, width = first.shape[:-1], first.shape[-1]
    vocab = width if lm_head_weight is None else lm_head_weight.shape[0]
    flat = [None if x is None else x.reshape(-1, width) for x in (student, teacher, refonly, anchor)]
    step = chunk_rows(impl, first.device, vocab, 4 * first.element_size(),
                      torch.finfo(compute_dtype(first.dtype)).bits // 8, workspace_bytes)

    def logits(x, w, b):
        return None if x is None else (x if w is None else F.linear(x, w, b)).contiguous()

    # No rows: no kernel call (as in pmi_kl), so an empty input's strides never reach a kernel's checks.
    parts = [first.new_empty(0, len(DIAGNOSTICS), dtype=compute_dtype(first.dtype))]
    for i in range(0, flat[0].shape[0], step):
        s, t, r, a = (None if x is None else x[i:i + step] for x in flat)
        if lm_head_weight is None:
            s, t, r, a = (logits(x, None, None) for x in (s, t, r, a))
        else:
            s = logits(s, lm_head_weight, lm_head_bias)
            t, r, a = (logits(x, w_f, b_f) for x in (t, r, a))
        parts.append(impl.diagnostics_rows(s, t, r, a, opts=opts))
    table = torch.cat(parts)
    return {key: table[:, j].reshape(lead) for j, key in enumerate(DIAGNOSTICS)}
