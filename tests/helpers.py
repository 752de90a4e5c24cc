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
