"""pmi_diagnostics on every path against the reference decomposition."""

import pytest
import torch

from conftest import PATHS
from helpers import assert_close, streams, upcast
from pmi_kernels import pmi_diagnostics
from pmi_kernels.reference import linear_logits, pmi_diagnostics_reference

OPTIONS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(clip=None, temperature=0.7), id="no-clip-temp"),
    pytest.param(dict(clip=2.0, center=False, beta=0.5), id="clip-no-center"),
]


@pytest.mark.parametrize("kwargs", OPTIONS)
@pytest.mark.parametrize("anchor", [False, True])
@pytest.mark.parametrize("device,backend", PATHS)
def test_logits_match_reference(device, backend, anchor, kwargs):
    s, t, r, a = streams(7, 1031, torch.float32, device, scale=4.0)
    # A large common offset, which no sum may cancel away.
    t += 30.0
    got = pmi_diagnostics(s, t, r, a if anchor else None, backend=backend, **kwargs)
    want = pmi_diagnostics_reference(*(upcast(x) for x in (s, t, r, a if anchor else None)), **kwargs)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == (7,)
        assert_close(got[key], want[key], torch.float32, key, factor=3, atol=1e-5)


@pytest.mark.parametrize("device,backend", PATHS)
def test_hidden_states_match_reference(device, backend):
    h = [torch.randn(2, 5, 16, device=device) for _ in range(3)]
    w, b = torch.randn(301, 16, device=device) * 0.5, torch.randn(301, device=device)
    got = pmi_diagnostics(*h, lm_head_weight=w, lm_head_bias=b, backend=backend, workspace_bytes=301 * 4 * 4 * 3)
    logits = [linear_logits(upcast(x), upcast(w), upcast(b)) for x in h]
    want = pmi_diagnostics_reference(*logits)
    for key in want:
        assert got[key].shape == (2, 5)
        assert_close(got[key], want[key], torch.float32, key, factor=3, atol=1e-5)


@pytest.mark.parametrize("device,backend", PATHS)
def test_small_pmi_residual(device, backend):
    """Δ_it = log p_T - log p_R zero or small next to Δ_total: its cosine is 0 for a zero vector
    and otherwise the reference's (the Triton kernel once expanded the dot products from raw
    sums, which cancelled here into cosines of -1e34)."""
    s, t = streams(5, 600, torch.float64, device, scale=3.0, count=2)
    same = pmi_diagnostics(s, t, t.clone(), backend=backend)
    assert (same["cos_total_pmi"] == 0).all()
    assert_close(same["cos_total_ref"], torch.ones(5, dtype=torch.float64, device=device), torch.float64, "cos")
    r = t + 1e-6 * torch.randn_like(t)
    got = pmi_diagnostics(s, t, r, backend=backend)
    want = pmi_diagnostics_reference(s, t, r)
    for key in want:
        assert_close(got[key], want[key], torch.float64, key, factor=1e3, atol=1e-9)


@pytest.mark.parametrize("device,backend", PATHS)
def test_uncentered_target_at_large_logits(device, backend):
    """Centering off under the clip, a teacher or reference-only logit of 1e6 or 1e8 beside O(1)
    ones (test_pmi_kl.test_uncentered_clip_at_large_logits): the target's KL and entropy as
    close to the float64 ones as fp32 allows at O(1)."""
    s, t, r = streams(3, 97, torch.float32, device, count=3)
    t[0, 7], r[1, 3], t[2, 2], r[2, 2] = 1e6, 1e8, 1e8, 1e8 - 8.0
    kwargs = dict(center=False, clip=3.0, beta=0.5)
    got = pmi_diagnostics(s, t, r, backend=backend, **kwargs)
    want = pmi_diagnostics_reference(*(upcast(x) for x in (s, t, r)), **kwargs)
    for key in ("kl_target_student", "entropy_target"):
        assert_close(got[key], want[key], torch.float32, key, factor=0.1)


@pytest.mark.parametrize("device,backend", PATHS)
def test_streams_far_apart(device, backend):
    """A teacher 1e5 above the student and an anchor 1e3 above it (each shift leaves its
    distribution as it was): KL(p_T || p_S) and KL(q || p) as close to the float64 ones as fp32
    allows at that scale (the Triton kernel once expanded E_pT[t - s] - (lse t - lse s), which
    cancelled to 1.0 against 1.007)."""
    s, t, r, a = streams(4, 300, torch.float32, device)
    t, a = t + 1e5, a + 1e3
    got = pmi_diagnostics(s, t, r, a, backend=backend)
    want = pmi_diagnostics_reference(*(upcast(x) for x in (s, t, r, a)))
    assert_close(got["kl_teacher_student"], want["kl_teacher_student"], torch.float32, "kl_teacher_student")
    assert_close(got["kl_target_student"], want["kl_target_student"], torch.float32, "kl_target_student", factor=10)


def test_properties():
    s, t, r = streams(6, 200, torch.float64, count=3)
    d = pmi_diagnostics(s, t, r)
    assert ((d["cos_total_ref"].abs() <= 1 + 1e-12) & (d["cos_total_pmi"].abs() <= 1 + 1e-12)).all()
    assert (d["kl_teacher_student"] >= 0).all() and (d["entropy_student"] >= 0).all()
    same = pmi_diagnostics(s, t, t)  # no reference-only difference: Δ_ref = Δ_total
    assert torch.allclose(same["cos_total_ref"], torch.ones(6, dtype=torch.float64))
    assert torch.allclose(same["norm_ratio_ref_total"], torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("device,backend", PATHS)
def test_empty_strided_input_gives_empty_results(device, backend, lead):
    """No rows, strided along the vocabulary (x[..., ::2]): every key, empty, as pmi_kl returns an
    empty loss; the C++ kernel's contiguity check refused it (on cpu and auto)."""
    from pmi_kernels import pmi_kl

    s, t, r, a = (torch.randn(*lead, 10, device=device)[..., ::2] for _ in range(4))
    for got in (pmi_diagnostics(s, t, r, backend=backend), pmi_diagnostics(s, t, r, a, backend=backend)):
        assert all(x.shape == lead and x.dtype == torch.float32 for x in got.values()), got
    assert pmi_kl(s, t, r, reduction="none", backend=backend).shape == lead


@pytest.mark.parametrize("center", [True, False], ids=["centered", "uncentered"])
@pytest.mark.parametrize("confident", [1e5, 1e6])
@pytest.mark.parametrize("device,backend", PATHS)
def test_streams_sharing_a_confident_token(device, backend, confident, center):
    """Student, teacher, reference-only teacher and anchor share one token at a logit of 1e5 or
    1e6, the rest O(1): every Δ is O(1) while each stream's log-probabilities stand near -1e5.
    Every column is the float64 reference's to 1e-5 (about 2e-7 now): formed from per-stream
    log-probabilities, the Δs cancelled to the logits' ulp (cosines 1e-4 off at 1e5, 2e-3 at 1e6)."""
    s, t, r, a = streams(16, 300, torch.float32, device)
    token, rows = torch.randint(300, (16,), device=device), torch.arange(16, device=device)
    for x in (s, t, r, a):
        x[rows, token] = confident + torch.randn(16, device=device)
    kwargs = dict(center=center, clip=3.0)
    got = pmi_diagnostics(s, t, r, a, backend=backend, **kwargs)
    want = pmi_diagnostics_reference(*(upcast(x) for x in (s, t, r, a)), **kwargs)
    for key in want:
        assert_close(got[key], want[key], torch.float32, key, factor=0.1, atol=1e-6)
