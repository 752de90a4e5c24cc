"""Precision at extreme logits on pinned inputs: every run sees the same rows, so a rounding
bug is caught every time, not when a random draw happens to expose it."""

import pytest
import torch

from conftest import PATHS
from helpers import assert_close, upcast
from pmi_kernels import pmi_kl
from pmi_kernels.reference import pmi_kl_reference

V = 37
TEMPERATURE = 0.5
TOP = 1e4
# The runner-up sits 3.5 below the top, 7 after scaling by 1/0.5: it holds e^-7 = 9.1e-4 of the
# mass, less than half an fp32 ulp of the scaled maximum 2e4 (2^-10 = 9.8e-4). So m + log z
# rounds to m and s - (m + log z) loses the runner-up's share; (s - m) - log z keeps it.
RUNNER_UP_GAP = 3.5


def top_and_runner_up(top, runner_up):
    row = torch.full((V,), -TOP)
    row[top], row[runner_up] = TOP, TOP - RUNNER_UP_GAP
    return row


def pinned_rows(mode):
    """(s, t, r, a) fp32 [4, V], the same on every run:
    0: the student is one token plus a runner-up at |logits| 1e4; the other streams moderate;
    1: the target is such a row (the anchor, with t = r so the PMI residual is exactly 0;
       the teacher in OPSD mode); the student splits its mass between the target's two tokens: the
       mixed JSD then feels q's rounding at first order, and reverse KL has no 4e4-sized
       terms to cancel (an fp32 error no implementation avoids);
    2: one-hot student and teacher on different tokens (a loss of 4e4);
    3: every stream random at scale 1e4.
    Only modes whose target does not move with the student: with a = s the same rounding
    error in p and q would cancel in p - q."""
    gen = torch.Generator().manual_seed(18)
    s, t, r, a = (torch.randn(4, V, generator=gen, dtype=torch.float64) * 3 for _ in range(4))
    s[0] = top_and_runner_up(5, 11)
    extreme_target = top_and_runner_up(2, 20)
    if mode == "opsd":
        t[1] = extreme_target
    else:
        a[1], r[1] = extreme_target, t[1]
    s[1, [2, 20]] = 30.0
    s[2], t[2] = -TOP, 0.0
    s[2, 7], t[2, 3] = TOP, 2 * TOP
    s[3], t[3], r[3], a[3] = torch.randn(4, V, generator=gen, dtype=torch.float64) * TOP
    s, t, r, a = (x.float() for x in (s, t, r, a))
    return (s, t, None, None) if mode == "opsd" else (s, t, r, a)


@pytest.mark.parametrize("jsd_beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["pmi-anchor", "opsd"])
@pytest.mark.parametrize("device,backend", PATHS)
def test_log_softmax_keeps_the_runner_up_at_extreme_logits(device, backend, mode, jsd_beta):
    """Catches log p or log q computed as s - (m + log z) instead of (s - m) - log z: that
    shifts rows 0 or 1 by the runner-up's share, 9e-4 in log-probability, which moves their
    O(1) losses by 1e-4 or more (bound 1e-5 relative) or the gradient by 1.5e-4 or more
    (bound 1e-4 of its largest entry + 1e-5). Under reverse KL a shift of log q leaves the
    gradient unchanged: the loss catches it."""
    s, t, r, a = (None if x is None else x.to(device) for x in pinned_rows(mode))
    s.requires_grad_(True)
    loss = pmi_kl(s, t, r, a, jsd_beta=jsd_beta, temperature=TEMPERATURE, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    s64 = upcast(s).requires_grad_(True)
    ref = pmi_kl_reference(
        s64, upcast(t), upcast(r), upcast(a), jsd_beta=jsd_beta, temperature=TEMPERATURE, reduction="none"
    )
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    # Each loss relative to itself: at 4e4 an fp32 ulp is 4e-3, on rows 0 and 1 the bug is 1e-4.
    torch.testing.assert_close(upcast(loss), ref, rtol=1e-5, atol=1e-6)
    assert_close(grad, ref_grad, torch.float32, "grad", atol=1e-5)
