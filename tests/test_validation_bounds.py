"""Every range check at its edges: each end of each option's range, in every function and loss
module that takes the option. A closed end is accepted exactly at the edge (and the call gives a
finite loss) and refused one float (or one integer) past it; an open end is refused exactly at
the edge and accepted one float inside it. A check that moved its bound, or turned >= into >,
fails here."""

import math

import pytest
import torch

from pmi_kernels import FusedPMIKLLoss, PMIKLLoss, fused_pmi_kl, pmi_diagnostics, pmi_kl

# (option, low, low is open, high): the ranges docs/loss.md states; every high end is closed.
RANGES = [
    ("beta", 1e-30, False, 1e30),
    ("temperature", 1e-30, False, 1e30),
    ("clip", 0.0, True, 1e30),
    ("entry_clip", 0.0, True, 1e30),
    ("jsd_beta", 0.0, False, 1.0),
    ("normalizer", 1e-30, False, 1e30),
    ("workspace_bytes", 1, False, 2**63 - 1),
]
TARGET_OPTIONS = ("beta", "clip", "temperature", "workspace_bytes")  # what pmi_diagnostics takes


def past(value, direction):
    """The next value past `value` towards `direction` (+1 or -1): the next integer for ints."""
    if isinstance(value, int):
        return value + direction
    return math.nextafter(value, direction * math.inf)


def edges():
    """(option, value, accepted) at both ends of every range."""
    for name, low, low_open, high in RANGES:
        yield pytest.param(name, high, True, id=f"{name}-high")
        yield pytest.param(name, past(high, +1), False, id=f"{name}-past-high")
        yield pytest.param(name, low, not low_open, id=f"{name}-low")
        inside_or_past = past(low, +1) if low_open else past(low, -1)
        yield pytest.param(name, inside_or_past, low_open, id=f"{name}-{'inside' if low_open else 'past'}-low")


def inputs():
    s, t, r, a = (torch.randn(3, 9) * 3 for _ in range(4))
    h = [torch.randn(3, 5) for _ in range(4)]
    return (s, t, r, a), h, torch.randn(9, 5)


def calls(name, value):
    """Every call that takes option `name` = value, by what it is called."""
    (s, t, r, a), h, w = inputs()
    given = {name: value}
    # The modules take the per-call normalizer in forward, every other option in the constructor.
    per_call, options = (given, {}) if name == "normalizer" else ({}, given)
    out = {
        "pmi_kl": lambda: pmi_kl(s, t, r, a, **given),
        "fused_pmi_kl": lambda: fused_pmi_kl(h[0], w, h[1], h[2], h[3], **given),
        "PMIKLLoss": lambda: PMIKLLoss(**options)(s, t, r, a, **per_call),
        "FusedPMIKLLoss": lambda: FusedPMIKLLoss(**options)(h[0], w, h[1], h[2], h[3], **per_call),
    }
    if name in TARGET_OPTIONS:
        out["pmi_diagnostics"] = lambda: pmi_diagnostics(s, t, r, a, **given)["kl_target_student"]
        out["pmi_diagnostics of hidden states"] = lambda: pmi_diagnostics(*h, lm_head_weight=w, **given)[
            "kl_target_student"
        ]
    return out


@pytest.mark.parametrize("name,value,accepted", list(edges()))
def test_each_end_of_each_range(name, value, accepted):
    """The modules run the checks at construction (options) or in forward (the normalizer)."""
    for function, call in calls(name, value).items():
        if accepted:
            assert torch.isfinite(call()).all(), (function, name, value)
        else:
            with pytest.raises(ValueError, match=f"^{name} must be"):
                call()
