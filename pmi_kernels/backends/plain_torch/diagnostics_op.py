"""pmi_diagnostics' rows in plain torch: the decomposition of the teacher's signal per row."""

from __future__ import annotations

import torch

from ...options import LossOptions, compute_dtype
from .row_op import log_ratio, log_softmax, row_lse_parts, target_logits


def _cosine(x, y, tiny):
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(tiny)


def diagnostics_rows(s_raw, t_raw, r_raw, a_raw=None, *, opts: LossOptions) -> torch.Tensor:
    """[C, 7] in backends.DIAGNOSTICS order; cosines of a zero vector are 0."""
    dtype = compute_dtype(s_raw.dtype)

    def scale(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(dtype) / opts.temperature

    s, t, r, a = map(scale, (s_raw, t_raw, r_raw, a_raw))
    lp, lt = log_softmax(s), log_softmax(t)
    lq = log_softmax(target_logits(s, t, r, a, None, opts))
    # Each difference of log-probabilities as the loss forms log p_T - log p_R (row_op.log_ratio):
    # lt - lr cancelled to the logits' ulp where the streams share a confident token at 1e5.
    parts = {name: row_lse_parts(x) for name, x in (("s", s), ("t", t), ("r", r))}
    total = log_ratio(t, s, parts["t"], parts["s"])
    ref = log_ratio(r, s, parts["r"], parts["s"])
    pmi = log_ratio(t, r, parts["t"], parts["r"])
    tiny = torch.finfo(dtype).tiny
    columns = [
        _cosine(total, ref, tiny),
        _cosine(total, pmi, tiny),
        ref.norm(dim=-1) / total.norm(dim=-1).clamp_min(tiny),
        (lt.exp() * total).sum(-1),
        (lq.exp() * (lq - lp)).sum(-1),
        -(lp.exp() * lp).sum(-1),
        -(lq.exp() * lq).sum(-1),
    ]
    return torch.stack(columns, dim=-1)
