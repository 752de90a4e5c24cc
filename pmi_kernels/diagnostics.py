"""`pmi_diagnostics`: the paper's decomposition of the teacher's signal, per position.

Rows go in chunks (bounded memory); each chunk's logits (given, or the head's GEMM outputs in
the input dtype, as in fused_pmi_kl) go through the backend's diagnostics row function.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import DIAGNOSTICS
from .call import prepare
from .heads import frozen_head, gather_heads
from .ops.planner import chunk_rows

Number = Union[float, Tensor]
# The [C, V] buffers a chunk holds in the input dtype: the four streams' logits.
_LOGIT_BUFFERS = 4


def _logits(x: Optional[Tensor], w: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else (x if w is None else F.linear(x, w, b)).contiguous()


@torch.no_grad()
def pmi_diagnostics(
    student: Tensor,
    teacher: Tensor,
    refonly: Tensor,
    anchor: Optional[Tensor] = None,
    *,
    lm_head_weight: Optional[Tensor] = None,
    lm_head_bias: Optional[Tensor] = None,
    frozen_weight: Optional[Tensor] = None,
    frozen_bias: Optional[Tensor] = None,
    beta: Number = 1.0,
    clip: Optional[Number] = 10.0,
    center: bool = True,
    temperature: Number = 1.0,
    check_finite: bool = True,
    backend: str = "auto",
    workspace_bytes: Optional[int] = None,
) -> Dict[str, Tensor]:
    """The decomposition of the teacher's signal per position (docs/loss.md), without gradients.

    Args:
        student, teacher, refonly, anchor: the streams, as logits, or as hidden states when
            lm_head_weight is given (anchor None: the student).
        lm_head_weight, lm_head_bias: the student's head; frozen_weight, frozen_bias: the frozen
            streams', defaulting as in fused_pmi_kl. Only with hidden-state streams.
        beta, clip, center, temperature: the target's options, as in pmi_kl.
        check_finite, backend: as in pmi_kl.
        workspace_bytes: bounds a chunk's logits (default: the CPU's cache, or 1 GiB on a GPU).
    Shapes:
        the streams: one shape [..., V] (logits) or [..., H] (hidden states); the heads [V, H]
        and [V].
    Returns:
        A dict of [...] tensors in the compute dtype: cos_total_ref = cos(Δ_total, Δ_ref),
        cos_total_pmi = cos(Δ_total, Δ_it), norm_ratio_ref_total = |Δ_ref| / |Δ_total|,
        kl_teacher_student = KL(p_T || p_S), kl_target_student = KL(q || p_S),
        entropy_student = H(p_S), entropy_target = H(q), with Δ_total = log p_T - log p_S,
        Δ_ref = log p_R - log p_S, Δ_it = log p_T - log p_R.
    """
    if refonly is None:
        raise ValueError("refonly is required: the decomposition needs the reference-only stream")
    heads = gather_heads(
        {
            "lm_head_weight": lm_head_weight,
            "lm_head_bias": lm_head_bias,
            "frozen_weight": frozen_weight,
            "frozen_bias": frozen_bias,
        }
    )
    lm_head_weight, lm_head_bias = heads["lm_head_weight"], heads["lm_head_bias"]
    streams = {"student": student, "teacher": teacher, "refonly": refonly, "anchor": anchor}
    call = prepare(
        streams,
        "H" if lm_head_weight is not None else "V",
        heads=heads,
        beta=beta,
        clip=clip,
        center=center,
        temperature=temperature,
        backend=backend,
        workspace_bytes=workspace_bytes,
        check_finite=check_finite,
    )
    width = call.shape[-1]
    vocab = width if lm_head_weight is None else lm_head_weight.shape[0]
    flat = [None if x is None else x.reshape(-1, width) for x in streams.values()]
    step = chunk_rows(
        call.backend,
        call.device,
        vocab,
        _LOGIT_BUFFERS * call.dtype.itemsize,
        call.compute_dtype.itemsize,
        workspace_bytes,
    )
    if lm_head_weight is not None:
        w_f, b_f = frozen_head(lm_head_weight, lm_head_bias, heads["frozen_weight"], heads["frozen_bias"])

    # No rows: no kernel call (as in pmi_kl), so an empty input's strides never reach a kernel's checks.
    parts = [torch.empty(0, len(DIAGNOSTICS), dtype=call.compute_dtype, device=call.device)]
    for i in range(0, flat[0].shape[0], step):
        s, t, r, a = (None if x is None else x[i : i + step] for x in flat)
        if lm_head_weight is None:
            s, t, r, a = (_logits(x, None, None) for x in (s, t, r, a))
        else:
            s = _logits(s, lm_head_weight, lm_head_bias)
            t, r, a = (_logits(x, w_f, b_f) for x in (t, r, a))
        parts.append(call.backend.diagnostics_rows(s, t, r, a, opts=call.opts))
    table = torch.cat(parts)
    return {key: table[:, j].reshape(call.lead) for j, key in enumerate(DIAGNOSTICS)}
