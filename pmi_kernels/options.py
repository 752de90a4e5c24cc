"""The scalar options of the PMI-KL loss, validated once and shared by every path."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cuda", "torch")

# Loss kinds, in the order the kernels number them.
FORWARD_KL, REVERSE_KL, MIXED_JSD = 0, 1, 2


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LossOptions:
    """beta, clip, center, temperature, jsd_beta and entry_clip of ../shared/SPEC.md.

    `pmi` is False in standard OPSD mode (no reference-only stream: q = softmax(t)).
    """

    pmi: bool = True
    beta: float = 1.0
    clip: Optional[float] = 10.0
    center: bool = True
    temperature: float = 1.0
    jsd_beta: float = 0.5
    entry_clip: Optional[float] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("beta", _positive("beta", self.beta))
        set_("temperature", _positive("temperature", self.temperature))
        if self.clip is not None:
            set_("clip", _positive("clip", self.clip))
        if self.entry_clip is not None:
            set_("entry_clip", _positive("entry_clip", self.entry_clip))
        lam = self.jsd_beta
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"jsd_beta must be a number in [0, 1], got {lam!r}")
        set_("jsd_beta", float(lam))
        if not isinstance(self.center, bool):
            raise ValueError(f"center must be a bool, got {self.center!r}")

    @property
    def loss_kind(self) -> int:
        if self.jsd_beta == 0.0:
            return FORWARD_KL
        if self.jsd_beta == 1.0:
            return REVERSE_KL
        return MIXED_JSD

    @property
    def needs_kappa(self) -> bool:
        """Whether the per-row shift of t - r matters: only under the tanh of the soft clip."""
        return self.pmi and self.clip is not None

    @property
    def separate_lse(self) -> bool:
        """Clip on, centering off: lse(t) and lse(r) are needed apart (SPEC, fused-linear form)."""
        return self.needs_kappa and not self.center
