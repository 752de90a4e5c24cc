"""The contract computed by hand, from its definitions, in float64 Python loops over tiny inputs
(V = 5), without pmi_kernels.reference: every path and the reference against it.

What the reference shares with the fast paths (the frozen-head defaulting, the diagnostics'
reading of the decomposition) cannot be checked by comparing them; only an independent
expansion catches a mistake there."""

import math

import pytest
import torch

from conftest import PATHS
from helpers import assert_close
from pmi_kernels import fused_pmi_kl, pmi_diagnostics, pmi_kl
from pmi_kernels.reference import fused_pmi_kl_reference, pmi_diagnostics_reference, pmi_kl_reference

N, V, H = 3, 5, 4
IMPLEMENTATIONS = PATHS + [pytest.param("cpu", "reference", id="reference")]


# ---- The definitions, on lists of Python floats (one row each).


def log_softmax(x):
    top = max(x)
    lse = top + math.log(sum(math.exp(v - top) for v in x))
    return [v - lse for v in x]


def linear(h, w, b):
    """h W^T + b for one row h [H], W [V][H], b [V] or None."""
    return [sum(hk * wk for hk, wk in zip(h, w_v)) + (0.0 if b is None else b[v]) for v, w_v in enumerate(w)]


def target_logits(s, t, r, a, *, beta, clip, center):
    """g from scaled logits: t in OPSD mode (r None), else a + clip(Δ)/β, a = s without an anchor,
    Δ = log softmax(t) - log softmax(r), centered over the vocabulary, soft-clipped c·tanh(Δ/c)."""
    if r is None:
        return list(t)
    delta = [x - y for x, y in zip(log_softmax(t), log_softmax(r))]
    if center:
        mean = sum(delta) / len(delta)
        delta = [d - mean for d in delta]
    if clip is not None:
        delta = [clip * math.tanh(d / clip) for d in delta]
    base = s if a is None else a
    return [x + d / beta for x, d in zip(base, delta)]


def divergence(lp, lq, lam, entry_clip):
    """λ = 0: KL(q||p); λ = 1: KL(p||q); else λ KL(q||m) + (1-λ) KL(p||m), m = (1-λ) p + λ q;
    each summand clamped at entry_clip."""
    total = 0.0
    for lpv, lqv in zip(lp, lq):
        p, q = math.exp(lpv), math.exp(lqv)
        if lam == 0:
            term = q * (lqv - lpv)
        elif lam == 1:
            term = p * (lpv - lqv)
        else:
            lm = math.log((1 - lam) * p + lam * q)
            term = lam * q * (lqv - lm) + (1 - lam) * p * (lpv - lm)
        total += term if entry_clip is None else min(term, entry_clip)
    return total


def hand_loss_and_grad(s, t, r, a, *, beta=1.0, clip=10.0, center=True, temperature=1.0, jsd_beta=0.5, entry_clip=None):
    """(loss, dloss/ds) of one row of raw logits. q is a constant: the gradient is the central
    difference of the divergence with g fixed at its value."""

    def scale(x):
        return None if x is None else [v / temperature for v in x]

    ss, ts, rs, as_ = map(scale, (s, t, r, a))
    lq = log_softmax(target_logits(ss, ts, rs, as_, beta=beta, clip=clip, center=center))

    def loss_at(x):
        return divergence(log_softmax(scale(x)), lq, jsd_beta, entry_clip)

    step, grad = 1e-5, []
    for v in range(len(s)):
        up, down = list(s), list(s)
        up[v] += step
        down[v] -= step
        grad.append((loss_at(up) - loss_at(down)) / (2 * step))
    return loss_at(s), grad


def norm(x):
    return math.sqrt(sum(v * v for v in x))


def cosine(x, y):
    if norm(x) == 0 or norm(y) == 0:
        return 0.0
    return sum(u * v for u, v in zip(x, y)) / (norm(x) * norm(y))


def hand_diagnostics(s, t, r, a, *, beta=1.0, clip=10.0, center=True, temperature=1.0):
    """The decomposition of the teacher's signal, one row: Δ_total = log p_T - log p_S,
    Δ_ref = log p_R - log p_S, Δ_it = log p_T - log p_R (vectors over V), q the PMI target."""

    def scale(x):
        return None if x is None else [v / temperature for v in x]

    s, t, r, a = map(scale, (s, t, r, a))
    lp, lt, lr = log_softmax(s), log_softmax(t), log_softmax(r)
    lq = log_softmax(target_logits(s, t, r, a, beta=beta, clip=clip, center=center))
    total = [x - y for x, y in zip(lt, lp)]
    ref = [x - y for x, y in zip(lr, lp)]
    inter = [x - y for x, y in zip(lt, lr)]

    def kl(lx, ly):
        return sum(math.exp(x) * (x - y) for x, y in zip(lx, ly))

    def entropy(lx):
        return -sum(math.exp(x) * x for x in lx)

    return {
        "cos_total_ref": cosine(total, ref),
        "cos_total_pmi": cosine(total, inter),
        "norm_ratio_ref_total": norm(ref) / norm(total),
        "kl_teacher_student": kl(lt, lp),
        "kl_target_student": kl(lq, lp),
        "entropy_student": entropy(lp),
        "entropy_target": entropy(lq),
    }


# ---- Helpers for the comparisons.


def rows(x):
    return None if x is None else x.tolist()


def on(device, *tensors):
    return [None if x is None else x.to(device) for x in tensors]


def random(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def exact(values):
    return torch.tensor(values, dtype=torch.float64)


LOSS_OPTIONS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(jsd_beta=0.0, clip=1.5, center=False, temperature=0.8), id="forward-kl-clip-no-center"),
    pytest.param(dict(jsd_beta=1.0, beta=0.6, clip=None, entry_clip=0.05), id="reverse-kl-entry-clip"),
    pytest.param(dict(jsd_beta=0.3, beta=2.0, clip=0.9, temperature=1.7), id="mixed-tight-clip"),
]
MODES = ["pmi", "pmi-anchor", "opsd"]


@pytest.mark.parametrize("kwargs", LOSS_OPTIONS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,backend", IMPLEMENTATIONS)
def test_pmi_kl_matches_hand_expansion(device, backend, mode, kwargs):
    """Catches a mistake in the loss's definition that a path shares with the reference, so that
    comparing them cannot see it: e.g. a target that ignores the anchor or skips the centering."""
    s, t, r, a = (random(N, V) * 2 for _ in range(4))
    r, a = (None, None) if mode == "opsd" else (r, a if mode == "pmi-anchor" else None)
    want = [
        hand_loss_and_grad(*(None if x is None else x[n] for x in map(rows, (s, t, r, a))), **kwargs) for n in range(N)
    ]
    s_in, t_in, r_in, a_in = on(device, s, t, r, a)
    s_in.requires_grad_(True)
    if backend == "reference":
        loss = pmi_kl_reference(s_in, t_in, r_in, a_in, reduction="none", **kwargs)
    else:
        loss = pmi_kl(s_in, t_in, r_in, a_in, reduction="none", backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s_in)
    assert_close(loss, exact([w[0] for w in want]), torch.float64, "loss")
    assert_close(grad, exact([w[1] for w in want]), torch.float64, "grad", factor=100)  # finite differences


# (lm_head_bias, frozen_weight, frozen_bias) given or not; the frozen streams use
# W_f = frozen_weight or else W, b_f = frozen_bias or else b, each on its own.
HEADS = [
    pytest.param(True, False, False, id="student-head"),
    pytest.param(True, True, False, id="frozen-weight-student-bias"),
    pytest.param(True, False, True, id="student-weight-frozen-bias"),
    pytest.param(True, True, True, id="frozen-head"),
    pytest.param(False, False, True, id="frozen-bias-only"),
    pytest.param(False, True, False, id="frozen-weight-no-biases"),
]
# The frozen bias must be visible: it cancels from the centered PMI residual, so each mode
# reads it elsewhere (the anchor; lse(t) - lse(r) under the clip without centering; the teacher).
FUSED_MODES = [
    pytest.param("pmi-anchor", dict(temperature=1.3, clip=2.0), id="pmi-anchor"),
    pytest.param("pmi", dict(center=False, clip=2.0, jsd_beta=0.0), id="pmi-no-center"),
    pytest.param("opsd", dict(jsd_beta=1.0, temperature=0.7), id="opsd"),
]


@pytest.mark.parametrize("has_bias,has_frozen_weight,has_frozen_bias", HEADS)
@pytest.mark.parametrize("mode,kwargs", FUSED_MODES)
@pytest.mark.parametrize("device,backend", IMPLEMENTATIONS)
def test_fused_pmi_kl_frozen_head_defaults(device, backend, mode, kwargs, has_bias, has_frozen_weight, has_frozen_bias):
    """Catches frozen-head defaulting that is not "each on its own": a frozen bias that ignores
    the student's when only frozen_weight is given (or follows frozen_weight's presence), a
    frozen weight taken from the wrong argument, the student's head used for the frozen streams;
    and gradients to h, W, b that are not dloss/ds chained through s = h W^T + b alone."""
    h, h_t, h_r, h_a = (random(N, H) for _ in range(4))
    h_r, h_a = (None, None) if mode == "opsd" else (h_r, h_a if mode == "pmi-anchor" else None)
    w, b = random(V, H), random(V) if has_bias else None
    w_0, b_0 = random(V, H) if has_frozen_weight else None, random(V) if has_frozen_bias else None
    # The frozen head by hand.
    w_f, b_f = rows(w if w_0 is None else w_0), rows(b if b_0 is None else b_0)

    def frozen(x):
        return None if x is None else linear(x, w_f, b_f)

    loss_want, grad_h, grad_w, grad_b = 0.0, [], [[0.0] * H for _ in range(V)], [0.0] * V
    for n in range(N):

        def row(x):
            return None if x is None else x[n].tolist()

        s = linear(row(h), rows(w), rows(b))
        loss_n, ds = hand_loss_and_grad(s, frozen(row(h_t)), frozen(row(h_r)), frozen(row(h_a)), **kwargs)
        loss_want += loss_n
        # s_v = Σ_k h_k W_vk + b_v: the chain rule by hand.
        grad_h.append([sum(ds[v] * w[v, k].item() for v in range(V)) for k in range(H)])
        for v in range(V):
            grad_b[v] += ds[v]
            for k in range(H):
                grad_w[v][k] += ds[v] * h[n, k].item()

    leaves = on(device, h, w, b)
    for x in leaves:
        if x is not None:
            x.requires_grad_(True)
    h_t, h_r, h_a, w_0, b_0 = on(device, h_t, h_r, h_a, w_0, b_0)
    args = dict(lm_head_bias=leaves[2], frozen_weight=w_0, frozen_bias=b_0, reduction="sum", **kwargs)
    if backend == "reference":
        loss = fused_pmi_kl_reference(leaves[0], leaves[1], h_t, h_r, h_a, **args)
    else:
        loss = fused_pmi_kl(leaves[0], leaves[1], h_t, h_r, h_a, backend=backend, **args)
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    assert_close(loss, exact(loss_want), torch.float64, "loss")
    for name, got, want in zip(("grad_h", "grad_w", "grad_b"), grads, (grad_h, grad_w, grad_b)):
        assert_close(got, exact(want), torch.float64, name, factor=100)  # finite differences


DIAGNOSTIC_OPTIONS = [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(beta=0.5, clip=1.2, center=False, temperature=1.3), id="tight-clip-no-center"),
]


def assert_diagnostics(got, want_rows):
    for key in want_rows[0]:
        assert_close(got[key], exact([w[key] for w in want_rows]), torch.float64, key, factor=10)


@pytest.mark.parametrize("kwargs", DIAGNOSTIC_OPTIONS)
@pytest.mark.parametrize("anchor", [False, True], ids=["no-anchor", "anchor"])
@pytest.mark.parametrize("device,backend", IMPLEMENTATIONS)
def test_diagnostics_match_hand_expansion(device, backend, anchor, kwargs):
    """Catches a diagnostic that reads the decomposition wrongly: a cosine of the wrong pair
    (Δ_ref for Δ_it), the norm ratio inverted, a KL in the wrong direction or of the wrong
    distribution (p_T for q), an entropy of the wrong distribution or sign."""
    s, t, r, a = (random(N, V) * 2 for _ in range(4))
    a = a if anchor else None
    want = [hand_diagnostics(*(None if x is None else x[n].tolist() for x in (s, t, r, a)), **kwargs) for n in range(N)]
    streams = on(device, s, t, r, a)
    if backend == "reference":
        got = pmi_diagnostics_reference(*streams, **kwargs)
    else:
        got = pmi_diagnostics(*streams, backend=backend, **kwargs)
    assert_diagnostics(got, want)


@pytest.mark.parametrize("has_bias,has_frozen_weight,has_frozen_bias", HEADS)
@pytest.mark.parametrize("device,backend", PATHS)
def test_diagnostics_of_hidden_states_frozen_head_defaults(
    device, backend, has_bias, has_frozen_weight, has_frozen_bias
):
    """Catches the diagnostics' frozen streams read with the student's head (or the frozen head
    defaulted as a pair rather than each on its own); the anchor carries the frozen bias."""
    h, h_t, h_r, h_a = (random(N, H) for _ in range(4))
    w, b = random(V, H), random(V) if has_bias else None
    w_0, b_0 = random(V, H) if has_frozen_weight else None, random(V) if has_frozen_bias else None
    w_f, b_f = rows(w if w_0 is None else w_0), rows(b if b_0 is None else b_0)
    want = [
        hand_diagnostics(
            linear(h[n].tolist(), rows(w), rows(b)), *(linear(x[n].tolist(), w_f, b_f) for x in (h_t, h_r, h_a))
        )
        for n in range(N)
    ]
    h, h_t, h_r, h_a, w, b, w_0, b_0 = on(device, h, h_t, h_r, h_a, w, b, w_0, b_0)
    got = pmi_diagnostics(
        h, h_t, h_r, h_a, lm_head_weight=w, lm_head_bias=b, frozen_weight=w_0, frozen_bias=b_0, backend=backend
    )
    assert_diagnostics(got, want)
