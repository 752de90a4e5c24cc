"""Numerics an independent fuzzing found wanting, held on every path: a large clip (the soft clip
of tiny arguments), a confident row at a large vocabulary (many tiny terms beside one large one),
the diagnostics' clamp of a zero norm, a one-entry row with any strides, fp64 weight gradients."""

import pytest
import torch

from conftest import PATHS
from helpers import assert_close, upcast
from pmi_kernels import fused_pmi_kl, pmi_diagnostics, pmi_kl
from pmi_kernels.reference import pmi_diagnostics_reference, pmi_kl_reference


@pytest.mark.parametrize("clip", [1e4, 1e8, 1e20])
@pytest.mark.parametrize("device,backend", PATHS)
def test_a_large_clip_is_no_clip(device, backend, clip):
    """c tanh(x / c) -> x: caught tanh computed as (1 - e)/(1 + e) at tiny x / c, where it cancels
    (the fp32 loss drifted 1e-3 at c = 1e6, 20% at 1e8)."""
    s, t, r = (torch.randn(4, 300, dtype=torch.float64).float().to(device) * 3 for _ in range(3))
    s.requires_grad_(True)
    loss = pmi_kl(s, t, r, clip=clip, jsd_beta=0.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    s64 = upcast(s).requires_grad_(True)
    ref = pmi_kl_reference(s64, upcast(t), upcast(r), clip=None, jsd_beta=0.0)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("jsd_beta", [0.0, 1.0])
@pytest.mark.parametrize("device,backend", PATHS)
def test_a_confident_row_at_a_large_vocabulary(device, backend, jsd_beta, monkeypatch):
    """One token 25 nats above 151,935 others, student and target agreeing: the loss is small and
    its sum of exps 1 + 1.5e5 terms of ~1e-11. Caught fp32 sums that lose the tiny terms beside
    the large one (3e-3 relative error on the C++ kernel, 3e-2 on plain torch's log_softmax)."""
    if backend == "triton" and device == "cpu":  # the interpreter's wide tiles: narrow ones take minutes
        import pmi_kernels.backends.triton.row_kernel as row_kernel

        monkeypatch.setattr(row_kernel, "INTERPRETER_BLOCK_V", 8192)
    gen = torch.Generator().manual_seed(0)
    vocab = 151936
    base = torch.randn(2, vocab, generator=gen) * 2
    s, t, r = (
        base.clone(),
        base + 0.3 * torch.randn(2, vocab, generator=gen),
        base + 0.3 * torch.randn(2, vocab, generator=gen),
    )
    s[:, 7] += 25
    t[:, 7] += 25
    r[:, 7] += 24
    loss = pmi_kl(s.to(device), t.to(device), r.to(device), jsd_beta=jsd_beta, reduction="sum", backend=backend)
    ref = pmi_kl_reference(s.double(), t.double(), r.double(), jsd_beta=jsd_beta, reduction="sum")
    assert abs(float(loss) - float(ref)) <= 1e-4 * abs(float(ref)), (float(loss), float(ref))


@pytest.mark.parametrize("device,backend", PATHS)
def test_the_norm_ratio_of_a_zero_total_is_clamped_alike(device, backend):
    """Teacher == student: Δ_total = 0, and |Δ_ref| / |Δ_total| divides by the compute dtype's
    smallest normal number on every path, as the reference does (the Triton kernel divided by
    1e-30: 4.5e15 where the others gave 1.7e308)."""
    s, r = (torch.randn(2, 13, dtype=torch.float64).to(device) for _ in range(2))
    got = pmi_diagnostics(s, s.clone(), r, backend=backend)
    want = pmi_diagnostics_reference(upcast(s), upcast(s), upcast(r))
    for key in want:
        assert torch.equal(got[key].cpu().isinf(), want[key].isinf()), key
        finite = want[key].isfinite()
        assert torch.allclose(got[key].cpu()[finite], want[key][finite], rtol=1e-9, atol=1e-12), key


@pytest.mark.parametrize("device,backend", PATHS)
def test_a_one_entry_row_with_any_strides(device, backend):
    """V = 1 through a strided view that is still contiguous (strides (2, 2)): the Triton launcher
    asserted a unit stride along the vocabulary, which one entry does not need."""
    s = torch.randn(1, 2, device=device)[:, ::2]
    assert s.is_contiguous() and s.stride() == (2, 2)
    one = torch.randn(1, 1, device=device)
    assert float(pmi_kl(s, one, one.clone(), backend=backend)) == 0.0


@pytest.mark.parametrize("device,backend", PATHS)
def test_grad_weight_fp32_keeps_fp64_weights_in_fp64(device, backend):
    """grad_weight_fp32 accumulates low-precision weights' gradients in fp32; an fp64 weight's
    stays fp64 (it was rounded through fp32: 5e-8 relative)."""
    h, h_t, h_r = (torch.randn(9, 8, dtype=torch.float64, device=device) for _ in range(3))
    w = torch.randn(41, 8, dtype=torch.float64, device=device).requires_grad_(True)
    grads = [
        torch.autograd.grad(
            fused_pmi_kl(h, w, h_t, h_r, backend=backend, grad_weight_fp32=flag, workspace_bytes=41 * 8 * 64), w
        )[0]
        for flag in (False, True)
    ]
    assert grads[1].dtype == torch.float64
    assert_close(grads[1], grads[0], torch.float64, "grad_W with grad_weight_fp32", factor=1e-3)
