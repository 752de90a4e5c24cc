"""The reference against the definition (docs/loss.md) written out by hand, its properties, and gradcheck."""

import pytest
import torch

from helpers import streams
from pmi_kernels.options import LossOptions
from pmi_kernels.reference import fused_pmi_kl_reference, pmi_diagnostics_reference, pmi_kl_reference, pmi_target_logits
from test_hand_expansion import divergence, log_softmax, target_logits


def hand_loss(s, t, r, a, *, beta, clip, center, temperature, jsd_beta, entry_clip):
    """One row of the definition, step by step, in Python floats (test_hand_expansion.py's)."""

    def scale(x):
        return None if x is None else [v / temperature for v in x]

    s, t, r, a = map(scale, (s, t, r, a))
    g = target_logits(s, t, r, a, beta=beta, clip=clip, center=center)
    return divergence(log_softmax(s), log_softmax(g), jsd_beta, entry_clip)


OPTION_CASES = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(jsd_beta=0.0), id="forward-kl"),
    pytest.param(dict(jsd_beta=1.0), id="reverse-kl"),
    pytest.param(dict(jsd_beta=0.3, beta=0.5, clip=0.7, temperature=1.7), id="mixed-tight-clip"),
    pytest.param(dict(clip=None, center=False, beta=2.0), id="no-clip-no-center"),
    pytest.param(dict(clip=2.0, center=False), id="clip-no-center"),
    pytest.param(dict(entry_clip=0.02, jsd_beta=0.0), id="entry-clip-forward"),
    pytest.param(dict(entry_clip=0.02, jsd_beta=0.6), id="entry-clip-mixed"),
]


@pytest.mark.parametrize("kwargs", OPTION_CASES)
@pytest.mark.parametrize("mode", ["pmi", "pmi-anchor", "opsd"])
def test_reference_matches_hand_expansion(kwargs, mode):
    s, t, r, a = streams(3, 11, torch.float64)
    r = None if mode == "opsd" else r
    a = a if mode == "pmi-anchor" else None
    full = dict(dict(beta=1.0, clip=10.0, center=True, temperature=1.0, jsd_beta=0.5, entry_clip=None), **kwargs)
    got = pmi_kl_reference(s, t, r, a, reduction="none", **full)
    for n in range(3):

        def row(x):
            return None if x is None else x[n].tolist()

        want = hand_loss(row(s), row(t), row(r), row(a), **full)
        assert got[n].item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_properties():
    s, t, r, a = streams(6, 50, torch.float64)
    q = pmi_target_logits(s, t, r).softmax(-1)
    assert torch.allclose(q.sum(-1), torch.ones(6, dtype=torch.float64))
    for lam in (0.0, 0.25, 0.5, 1.0):
        assert (pmi_kl_reference(s, t, r, jsd_beta=lam, reduction="none") >= -1e-12).all()
    # jsd_beta 0 and 1 are the forward and reverse KL, written out.
    lp, lq = s.log_softmax(-1), pmi_target_logits(s, t, r).log_softmax(-1)
    fwd = (lq.exp() * (lq - lp)).sum(-1)
    rev = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(pmi_kl_reference(s, t, r, jsd_beta=0.0, reduction="none"), fwd)
    assert torch.allclose(pmi_kl_reference(s, t, r, jsd_beta=1.0, reduction="none"), rev)
    # Standard OPSD mode distils the teacher itself.
    lt = t.log_softmax(-1)
    assert torch.allclose(pmi_kl_reference(s, t, jsd_beta=0.0, reduction="none"), (lt.exp() * (lt - lp)).sum(-1))
    # Per-row constants added to t or r change nothing, with and without centering.
    shift = torch.randn(6, 1, dtype=torch.float64) * 50
    for center in (True, False):
        base = pmi_kl_reference(s, t, r, center=center, reduction="none")
        moved = pmi_kl_reference(s, t + shift, r - 2 * shift, center=center, reduction="none")
        assert torch.allclose(base, moved, rtol=1e-9, atol=1e-12)
    # A huge beta leaves q = the anchor (here the student): loss 0.
    assert pmi_kl_reference(s, t, r, beta=1e12).abs().item() < 1e-9


def test_clipped_residual_is_bounded():
    s, t, r = streams(4, 40, torch.float64, count=3, scale=30.0)
    for clip in (0.5, 3.0):
        residual = pmi_target_logits(s, t, r, None, LossOptions(pmi=True, beta=1.0, clip=clip, center=True)) - s
        assert residual.abs().max() <= clip * (1 + 1e-12)  # (g - s) rounds


def test_mask_and_reductions():
    s, t, r = streams(8, 30, torch.float64, count=3)
    s.requires_grad_(True)
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    per_row = pmi_kl_reference(s, t, r, reduction="none")
    masked = pmi_kl_reference(s, t, r, mask=mask, reduction="none")
    assert (masked[~mask] == 0).all() and torch.equal(masked[mask], per_row[mask])
    assert torch.allclose(pmi_kl_reference(s, t, r, mask=mask, reduction="sum"), per_row[mask].sum())
    mean = pmi_kl_reference(s, t, r, mask=mask)
    assert torch.allclose(mean, per_row[mask].sum() / mask.sum())
    (grad,) = torch.autograd.grad(mean, s)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    empty = pmi_kl_reference(s, t, r, mask=torch.zeros(8, dtype=torch.bool))
    assert empty.item() == 0.0


@pytest.mark.parametrize("kwargs", OPTION_CASES)
def test_gradcheck(kwargs):
    """With a given anchor (or in OPSD mode) the target is fixed, so the numerical Jacobian
    is the analytical one; without an anchor the stop-gradient is checked against that."""
    s, t, r, a = streams(3, 9, torch.float64)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pmi_kl_reference(x, t, r, a, reduction="none", **kwargs), (s,))
    assert torch.autograd.gradcheck(lambda x: pmi_kl_reference(x, t, reduction="sum", **kwargs), (s,))
    (free,) = torch.autograd.grad(pmi_kl_reference(s, t, r, **kwargs), s)
    (frozen,) = torch.autograd.grad(pmi_kl_reference(s, t, r, s.detach(), **kwargs), s)
    assert torch.allclose(free, frozen, rtol=1e-12, atol=1e-15)


def test_fused_reference_is_logits_of_the_linear_form():
    h, ht, hr = (torch.randn(5, 7, dtype=torch.float64) for _ in range(3))
    w, b = torch.randn(13, 7, dtype=torch.float64), torch.randn(13, dtype=torch.float64)
    w_f = torch.randn(13, 7, dtype=torch.float64)
    got = fused_pmi_kl_reference(h, w, ht, hr, lm_head_bias=b, frozen_weight=w_f, reduction="none")
    want = pmi_kl_reference(h @ w.T + b, ht @ w_f.T + b, hr @ w_f.T + b, reduction="none")
    assert torch.allclose(got, want)


def test_diagnostics_decomposition():
    s, t, r = streams(5, 40, torch.float64, count=3)
    d = pmi_diagnostics_reference(s, t, r)
    lp, lt, lr = s.log_softmax(-1), t.log_softmax(-1), r.log_softmax(-1)
    total, ref = lt - lp, lr - lp
    cos = (total * ref).sum(-1) / (total.norm(dim=-1) * ref.norm(dim=-1))
    assert torch.allclose(d["cos_total_ref"], cos)
    assert torch.allclose(d["norm_ratio_ref_total"], ref.norm(dim=-1) / total.norm(dim=-1))
    assert torch.allclose(d["entropy_student"], -(lp.exp() * lp).sum(-1))
    assert torch.allclose(d["kl_teacher_student"], pmi_kl_reference(s, t, jsd_beta=0.0, reduction="none"))
    assert torch.allclose(d["kl_target_student"], pmi_kl_reference(s, t, r, jsd_beta=0.0, reduction="none"))
