"""Shared test helpers: random streams, tolerances, and closeness checks."""

import torch

# Relative tolerance (of the largest reference magnitude) by the dtype a result is stored in.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def streams(n, v, dtype=torch.float32, device="cpu", count=4, scale=3.0):
    """`count` logit-like tensors [n, v] of one dtype, drawn fresh."""
    return [(torch.randn(n, v, dtype=torch.float64) * scale).to(dtype).to(device) for _ in range(count)]


def upcast(x):
    return None if x is None else x.detach().to("cpu", torch.float64)


def assert_close(actual, expected, dtype, what, factor=1.0, atol=0.0):
    """|actual - expected| <= factor * tol(dtype) * max|expected| + atol, elementwise; no NaN."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bound = factor * TOLERANCE[dtype] * expected.abs().max().clamp_min(1e-30) + atol
    err = (actual - expected).abs().max()
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def clear_entry_clip(kwargs: dict, s, t, r=None, a=None, gap: float = 1e-5) -> dict:
    """kwargs with entry_clip moved (by parts in 1e5) off every summand of the float64 reference
    over logits s, t, r, a: a summand within rounding of the clip is clamped on one side and not
    the other, and the gradient jumps there (its slope is 0 where clamped)."""
    from pmi_kernels.options import LossOptions
    from pmi_kernels.reference import jsd_summands, pmi_target_logits

    clip = kwargs.get("entry_clip")
    if clip is None:
        return kwargs
    opts = LossOptions(pmi=r is not None, **kwargs)
    s, t, r, a = (None if x is None else upcast(x) / opts.temperature for x in (s, t, r, a))
    summands = jsd_summands(s.log_softmax(-1), pmi_target_logits(s, t, r, a, opts).log_softmax(-1), opts.jsd_beta)
    while ((summands - clip).abs() <= gap * clip).any():
        clip *= 1 + 4 * gap
    return {**kwargs, "entry_clip": clip}
