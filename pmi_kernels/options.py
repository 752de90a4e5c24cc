"""The scalar options of the PMI-KL loss, validated once and shared by every path.

LossOptions is built by keyword only. `LossOptions.kernel_scalars()` derives the eight numbers
the kernels read (for Triton; csrc/include/rows_args.h's `LossOptions::scalars` mirrors it).
Every custom op (pmi_kernels/ops, the C++ op) takes the options as named, typed arguments.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

REDUCTIONS = ("mean", "sum", "none")

# Loss kinds, numbered as every kernel numbers them (csrc/include/pmi_math.h too).
FORWARD_KL, REVERSE_KL, MIXED_JSD = 0, 1, 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics in fp32 for bf16/fp16/fp32 inputs, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


# The options' range: the kernels compute in fp32, where a reciprocal of a beta or temperature
# below 1e-30 scales logits past fp32's range, and a clip above 1e30 is no clip (pass None). The
# normalizer has the same range: fp32 rounds 1e-45 to 0 and 1e300 to inf.
SMALLEST, LARGEST = 1e-30, 1e30


def is_number_tensor(value) -> bool:
    """A tensor that holds one real number: 0-d, dense, not bool or complex, not on the meta device."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and value.layout == torch.strided
        and value.dtype != torch.bool
        and not value.is_complex()
        and not value.is_meta
    )


def real_value(value) -> Optional[float]:
    """The float of a numeric option as given: a Python or numpy real scalar, or a number tensor
    (is_number_tensor); None for anything else. An int too large for a float is inf."""
    if isinstance(value, torch.Tensor):
        return float(value) if is_number_tensor(value) else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def check_number(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """The one rule for every numeric option (beta, clip, temperature, jsd_beta, entry_clip, the
    normalizer): real_value's forms, finite, in [low, high] ((low, high] when low_open).
    Returns it as a float."""
    number = real_value(value)
    inside = (
        number is not None
        and math.isfinite(number)
        and (number > low if low_open else number >= low)
        and number <= high
    )
    if not inside:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(
            f"{name} must be a finite number in {bounds} (a Python or numpy number or a 0-d tensor), got {value!r}"
        )
    return number


class KernelScalars(NamedTuple):
    """The options as the kernels read them (csrc/include/pmi_math.h's Scalars<T>, same order):
    1/τ, 1/β, the clip c (1 when there is none) and 1/c, the JSD weight λ with log(1 - λ) and
    log λ (0 where they would be -inf: that loss kind never reads them), the entry clip (0: none)."""

    inv_tau: float
    inv_beta: float
    clip: float
    inv_clip: float
    lam: float
    log_1m_lam: float
    log_lam: float
    entry_clip: float


@dataclass(frozen=True, kw_only=True)
class LossOptions:
    """beta, clip, center, temperature, jsd_beta and entry_clip of the loss (docs/loss.md).

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
        # torch.compile(dynamic=True) traces float options as symbols, which no check can read:
        # traced, the options pass as given. Each custom op builds LossOptions again from its
        # named arguments when it runs, outside the trace, where these checks refuse a bad value.
        if torch.compiler.is_compiling():
            return

        def set_(name: str, value: object) -> None:  # the dataclass is frozen
            object.__setattr__(self, name, value)

        set_("beta", check_number("beta", self.beta, SMALLEST, LARGEST))
        set_("temperature", check_number("temperature", self.temperature, SMALLEST, LARGEST))
        for name in ("clip", "entry_clip"):  # None: no clip
            if getattr(self, name) is not None:
                set_(name, check_number(name, getattr(self, name), 0.0, LARGEST, low_open=True))
        set_("jsd_beta", check_number("jsd_beta", self.jsd_beta, 0.0, 1.0))
        for name in ("pmi", "center"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def kernel_scalars(self) -> KernelScalars:
        """The kernels' scalars, in float64; the one derivation on the Python side (the Triton
        launchers), mirrored by LossOptions::scalars in csrc/include/rows_args.h."""
        lam, clip = self.jsd_beta, 1.0 if self.clip is None else self.clip
        return KernelScalars(
            inv_tau=1.0 / self.temperature,
            inv_beta=1.0 / self.beta,
            clip=clip,
            inv_clip=1.0 / clip,
            lam=lam,
            log_1m_lam=math.log1p(-lam) if lam < 1 else 0.0,
            log_lam=math.log(lam) if lam > 0 else 0.0,
            entry_clip=0.0 if self.entry_clip is None else self.entry_clip,
        )

    def target_keywords(self) -> dict:
        """The options that define the target q, as pmi_diagnostics takes them."""
        return dict(beta=self.beta, clip=self.clip, center=self.center, temperature=self.temperature)

    def keywords(self) -> dict:
        """Every option, as pmi_kl and fused_pmi_kl take them (pmi is their refonly stream's presence)."""
        return dict(self.target_keywords(), jsd_beta=self.jsd_beta, entry_clip=self.entry_clip)

    def op_arguments(self) -> dict:
        """Every option, pmi included, as the custom ops' schemas name them (the Python ops in
        pmi_kernels/ops and the C++ ops): `bool pmi, float beta, float? clip, ...`."""
        return dict(self.keywords(), pmi=self.pmi)

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
        """Clip on, centering off: lse(t) and lse(r) are needed apart (the fused-linear form)."""
        return self.needs_kappa and not self.center

    @property
    def fast_grad(self) -> bool:
        """Forward KL without entry_clip: dloss/ds = (p - q) / tau needs no row sum."""
        return self.loss_kind == FORWARD_KL and self.entry_clip is None
