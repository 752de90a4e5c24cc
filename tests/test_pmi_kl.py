"""pmi_kl over logits, every path against the float64 reference on fresh random inputs."""

import pytest
import torch

from conftest import INTERPRET, PATHS, requires_cuda
from helpers import assert_close, clear_entry_clip, streams, upcast
from pmi_kernels import pmi_kl
from pmi_kernels.options import LossOptions
from pmi_kernels.reference import pmi_kl_reference

MODES = ["pmi", "pmi-anchor", "opsd"]
OPTIONS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(jsd_beta=0.0), id="forward-kl"),
    pytest.param(dict(jsd_beta=1.0, temperature=0.6), id="reverse-kl-temp"),
    pytest.param(dict(jsd_beta=0.3, beta=0.4, clip=0.8), id="mixed-tight-clip"),
    pytest.param(dict(clip=None, center=False, beta=2.5), id="no-clip-no-center"),
    pytest.param(dict(clip=3.0, center=False, jsd_beta=0.0), id="clip-no-center"),
    pytest.param(dict(clip=None, jsd_beta=0.7), id="no-clip-center"),
    pytest.param(dict(entry_clip=2e-3, jsd_beta=0.0), id="entry-clip-forward"),
    pytest.param(dict(entry_clip=2e-3, jsd_beta=1.0), id="entry-clip-reverse"),
    pytest.param(dict(entry_clip=1e-3), id="entry-clip-mixed"),
]


def run_both(device, backend, s, t, r=None, a=None, mask=None, reduction="none", **kwargs):
    """(loss, grad) of the path and of the float64 reference, with a random upstream gradient."""
    s = s.detach().requires_grad_(True)
    loss = pmi_kl(s, t, r, a, mask=mask, reduction=reduction, backend=backend, **kwargs)
    upstream = torch.rand_like(loss, dtype=torch.float64).to(loss.dtype)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), s)
    s64 = upcast(s).requires_grad_(True)
    ref = pmi_kl_reference(
        s64,
        upcast(t),
        upcast(r),
        upcast(a),
        mask=upcast(mask) if mask is None else mask.cpu(),
        reduction=reduction,
        **kwargs,
    )
    (ref_grad,) = torch.autograd.grad((ref * upstream.cpu().double()).sum(), s64)
    assert grad.dtype == s.dtype
    return loss, grad, ref, ref_grad


def pick(mode, t, r, a):
    return (None if mode == "opsd" else r), (a if mode == "pmi-anchor" else None)


@pytest.mark.parametrize("kwargs", OPTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,backend", PATHS)
def test_matches_reference(device, backend, mode, kwargs):
    # Odd N and V, a V that is not a multiple of any tile, one masked row.
    s, t, r, a = streams(7, 1031, torch.float32, device)
    r, a = pick(mode, t, r, a)
    mask = torch.rand(7, device=device) > 0.2
    kwargs = clear_entry_clip(kwargs, s, t, r, a)
    loss, grad, ref, ref_grad = run_both(device, backend, s, t, r, a, mask=mask, **kwargs)
    assert_close(loss, ref, torch.float32, "loss", atol=1e-6)
    assert_close(grad, ref_grad, torch.float32, "grad", atol=1e-9)
    assert (grad[~mask] == 0).all() and (loss[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("device,backend", PATHS)
def test_input_dtypes(device, backend, dtype):
    """Statistics in fp32 (fp64 for fp64) on the exact input values; the gradient is stored in
    the student's dtype, so its error is that dtype's rounding."""
    s, t, r = streams(5, 777, dtype, device, count=3)
    loss, grad, ref, ref_grad = run_both(device, backend, s, t, r, jsd_beta=0.4)
    assert_close(loss, ref, torch.float64 if dtype == torch.float64 else torch.float32, "loss", atol=1e-6)
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_leading_dims_mask_reduction(device, backend, reduction):
    s, t, r = (x.reshape(2, 3, 257) for x in streams(6, 257, torch.float32, device, count=3))
    mask = torch.tensor([[True, False, True], [True, True, False]], device=device)
    loss, grad, ref, ref_grad = run_both(device, backend, s, t, r, mask=mask, reduction=reduction)
    assert loss.shape == ref.shape
    assert_close(loss, ref, torch.float32, "loss", atol=1e-6)
    assert_close(grad, ref_grad, torch.float32, "grad", atol=1e-9)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("device,backend", PATHS)
def test_fully_masked_and_empty(device, backend):
    s, t, r = streams(3, 100, torch.float32, device, count=3)
    s.requires_grad_(True)
    loss = pmi_kl(s, t, r, mask=torch.zeros(3, dtype=torch.bool, device=device), backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and (grad == 0).all()
    empty = torch.empty(0, 100, device=device)
    assert pmi_kl(empty, empty, empty, backend=backend).item() == 0.0


@pytest.mark.parametrize("jsd_beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("device,backend", PATHS)
def test_extreme_logits(device, backend, jsd_beta):
    """|logits| up to 1e4 and one-hot rows: finite, and as close as fp32 allows at that scale."""
    s, t, r, a = streams(4, 513, torch.float32, device, scale=1e4)
    s[0] = -1e4
    s[0, 7] = 1e4  # one token takes all the mass
    t[1] = 0.0
    t[1, 3] = 2e4
    loss, grad, ref, ref_grad = run_both(device, backend, s, t, r, a, jsd_beta=jsd_beta, temperature=0.5)
    scale = 4e4 * torch.finfo(torch.float32).eps * 513  # rounding of |x / tau| ~ 2e4, summed over V
    assert_close(loss, ref, torch.float32, "loss", atol=scale)
    assert_close(grad, ref_grad, torch.float32, "grad", factor=100, atol=1e-6)


@pytest.mark.parametrize("jsd_beta", [0.0, 0.5])
@pytest.mark.parametrize("device,backend", PATHS)
def test_uncentered_clip_at_large_logits(device, backend, jsd_beta):
    """Centering off, the clip on, a teacher or reference-only logit of 1e6 or 1e8 beside O(1)
    ones: Δ = log p_T - log p_R is formed from (x - max) - log z, so the loss stays as close to
    the float64 one as fp32 allows at O(1) (t - r less lse(t) - lse(r) cancelled to 3% at 1e8)."""
    s, t, r, a = streams(4, 97, torch.float32, device)
    t[0, 7], r[1, 3], t[2, 5], r[2, 11], t[3, 2] = 1e6, 1e8, 1e8, 5e7, 1e8
    r[3, 2] = 1e8 - 8.0  # both large at one token: their difference, not their size, counts
    loss, grad, ref, ref_grad = run_both(
        device, backend, s, t, r, a, jsd_beta=jsd_beta, center=False, clip=3.0, beta=0.5
    )
    assert_close(loss, ref, torch.float32, "loss", factor=0.1)
    assert_close(grad, ref_grad, torch.float32, "grad", atol=1e-6)


@pytest.mark.parametrize("masked,streams_masked", [(-1e30, "tr"), (-1e4, "stra")])
@pytest.mark.parametrize("device,backend", PATHS)
def test_masked_first_tokens(device, backend, masked, streams_masked):
    """Token 0 masked with a large negative logit (a padding token) in the teacher streams, or in
    every stream: the loss and gradient as the reference's. A shift of each row by its first
    entry (tried once, to cancel large offsets) made t - r and the target lose their variation:
    a loss of 0 against 0.36, or 2e-4 off with the student's token 0 at -1e4. (The reference
    once formed log p_T - log p_R per stream, which rounds lse away beside -1e30 even in fp64.)"""
    s, t, r, a = streams(4, 257, torch.float32, device)
    for name, x in zip("stra", (s, t, r, a)):
        if name in streams_masked:
            x[:, 0] = masked
    for anchor in (None, a):
        loss, grad, ref, ref_grad = run_both(device, backend, s, t, r, anchor)
        assert_close(loss, ref, torch.float32, "loss", atol=1e-6)
        assert_close(grad, ref_grad, torch.float32, "grad", atol=1e-9)


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs Triton (GPU or interpreter)")
def test_kernel_writes_every_output():
    """Outputs are NaN before the launch; every gradient element and loss must be written."""
    from pmi_kernels.backends.triton.row_kernel import rows as triton_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for kwargs in (dict(jsd_beta=0.0), dict(jsd_beta=0.5), dict(jsd_beta=1.0, entry_clip=1e-3)):
        s, t, r = streams(6, 333, torch.float32, device, count=3)
        mask = torch.tensor([True, False, True, True, False, True], device=device)
        grad = torch.full_like(s, float("nan"))
        loss = triton_rows(s, t, r, opts=LossOptions(pmi=True, **kwargs), mask=mask, grad_out=grad)
        assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
        assert (grad[~mask] == 0).all() and (loss[~mask] == 0).all()


@pytest.mark.parametrize("device,backend", PATHS)
def test_gradient_in_place_over_student(device, backend):
    """The row operation may write the gradient over the student logits (the fused path does)."""
    from pmi_kernels.backends import REGISTRY

    s, t, r = streams(5, 300, torch.float32, device, count=3)
    opts = LossOptions(pmi=True, jsd_beta=0.5)
    separate = torch.empty_like(s)
    loss = REGISTRY[backend].rows(s, t, r, opts=opts, grad_out=separate)
    in_place = s.clone()
    loss2 = REGISTRY[backend].rows(in_place, t, r, opts=opts, grad_out=in_place)
    assert torch.equal(loss, loss2) and torch.allclose(in_place, separate, rtol=0, atol=1e-9)


def test_torch_compile_fullgraph():
    """pmi_kl traces without a graph break: the row work is one opaque custom op."""
    s, t, r = streams(4, 64, torch.float32, count=3)
    mask = torch.tensor([True, True, False, True])

    def loss_fn(student, teacher, refonly):
        return pmi_kl(student, teacher, refonly, mask=mask, jsd_beta=0.2, check_finite=False)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    eager, traced = loss_fn(s1, t, r), compiled(s2, t, r)
    (g1,) = torch.autograd.grad(eager, s1)
    (g2,) = torch.autograd.grad(traced, s2)
    assert torch.allclose(eager, traced) and torch.allclose(g1, g2)


@pytest.mark.parametrize("option", ["clip", "entry_clip"])
def test_compiled_call_refuses_a_zero_clip(option):
    """Traced with dynamic shapes, a float option is a symbol no Python check can read; the
    custom op builds the options again from its named arguments when it runs, so a compiled
    clip=0 is the eager ValueError, not a silent "no clip" (the packed float[] read 0 as None)."""
    s, t, r = streams(4, 32, torch.float32, count=3)
    compiled = torch.compile(
        lambda s, t, r, c: pmi_kl(s, t, r, check_finite=False, **{option: c}),
        fullgraph=True,
        dynamic=True,
        backend="aot_eager",
    )
    compiled(s, t, r, 2.0)
    with pytest.raises(ValueError, match=option):
        compiled(s, t, r, 0.0)


@requires_cuda
def test_cuda_and_cpu_paths_agree():
    s, t, r = streams(9, 4099, torch.bfloat16, "cuda", count=3)
    gpu = pmi_kl(s, t, r, reduction="none", backend="triton")
    cpu = pmi_kl(s.cpu(), t.cpu(), r.cpu(), reduction="none", backend="torch")
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", PATHS)
def test_fp16_gradient_under_a_loss_scaler(device, backend):
    """fp16 logits, the loss scaled by GradScaler's 65536: the gradient is 65536 times the
    float64 reference's. The stored gradient is (p - q), scaled in the backward, not (p - q)/N in
    fp16, whose entries (about 2e-6 here) sat among fp16's subnormals or flushed to 0. Fails with
    1/N folded into the fp16 gradient in the forward."""
    gen = torch.Generator().manual_seed(5)
    s, t, r = (torch.randn(512, 1024, generator=gen).to(device, torch.float16) for _ in range(3))
    s.requires_grad_(True)
    (pmi_kl(s, t, r, backend=backend) * 65536.0).backward()
    s64 = upcast(s.detach()).requires_grad_(True)
    (pmi_kl_reference(s64, upcast(t), upcast(r)) * 65536.0).backward()
    error = (s.grad.double() - s64.grad).norm() / s64.grad.norm()
    assert s.grad.isfinite().all() and error < 2e-3, float(error)
