"""The backends: each computes the row operation (and the diagnostics rows) one way.

A backend is a package under pmi_kernels/backends/ with two functions,

    rows(s, t, r, a, *, opts, phase=Phase.ALL, kappa=None, mask=None, row_scale=None, grad_out=None,
         stats_out=None, lse_out=None, lse_in=None, slope_sum_out=None, slope_sum_in=None) -> loss [C]
    diagnostics_rows(s, t, r, a, *, opts) -> [C, len(DIAGNOSTICS)]

over raw logit rows [C, V] (unit stride along V), and one entry in REGISTRY below. The contract
they keep is written once, as a typing.Protocol: backends/contract.py (RowBackend, and Phase,
the passes a vocabulary split runs). In short: per-row loss in the compute dtype, 0 where
masked; when grad_out is given, row_scale * dloss/ds_raw written into it (it may alias s); when
stats_out [C, 3] is given, KL(q||p), H(p) and H(q) per row.
The layers above (call.py, ops/) reach a backend only through this registry.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..lazy_dynamo import assume_constant_result

# The per-row statistics stats_out holds, in this column order.
STATS = ("kl_target_student", "entropy_student", "entropy_target")
# The columns of diagnostics_rows.
DIAGNOSTICS = (
    "cos_total_ref",
    "cos_total_pmi",
    "norm_ratio_ref_total",
    "kl_teacher_student",
    "kl_target_student",
    "entropy_student",
    "entropy_target",
)


def _interpreter_reason() -> Optional[str]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "backend='triton' on CPU tensors runs only under TRITON_INTERPRET=1 (set before pmi_kernels is imported)"


def _extension_reason(device_type: str) -> Optional[str]:
    from .native import extension

    return extension.unavailable_reason(device_type)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: Tuple[str, ...]  # the device types whose tensors it takes
    module: str  # the package (under pmi_kernels.backends) with rows() and diagnostics_rows()
    # Compute-dtype [C, V] temporaries the row operation keeps alive: the chunk planner's workspace.
    row_temporaries: int
    # None when usable on that device type, else why not (called lazily: building the
    # C++ extension or importing Triton happens only when a backend is asked for).
    reason_unusable: Callable[[str], Optional[str]] = lambda device_type: None

    def _impl(self):
        return importlib.import_module(f"{__name__}.{self.module}")

    @property
    def rows(self):
        return self._impl().rows

    @property
    def diagnostics_rows(self):
        return self._impl().diagnostics_rows

    @property
    def streams_rows(self) -> bool:
        """Whether it takes any number of logit rows at once (no temporaries to bound)."""
        return self.row_temporaries == 0

    def unusable_on(self, device_type: str) -> Optional[str]:
        """None when it runs on `device_type` tensors here, else why not."""
        return _reason_unusable(self.name, device_type)


REGISTRY: Dict[str, Backend] = {
    "torch": Backend("torch", ("cpu", "cuda"), "plain_torch", row_temporaries=12),
    "triton": Backend(
        "triton",
        ("cuda", "cpu"),
        "triton",
        row_temporaries=0,
        reason_unusable=lambda d: _interpreter_reason() if d == "cpu" else None,
    ),
    "cuda": Backend("cuda", ("cuda",), "native", row_temporaries=0, reason_unusable=_extension_reason),
    "cpu": Backend("cpu", ("cpu",), "native", row_temporaries=0, reason_unusable=_extension_reason),
}
# What backend="auto" tries, fastest first, per device type; the first usable one runs.
# CUDA: Triton before the CUDA kernels (see benchmarks/README.md for the measured order).
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
BACKENDS = ("auto",) + tuple(REGISTRY)


# torch.compile calls this once and keeps the answer: it may stat files or build the extension.
@assume_constant_result
def _reason_unusable(name: str, device_type: str) -> Optional[str]:
    backend = REGISTRY[name]
    if device_type not in backend.devices:
        return f"backend={name!r} takes {' or '.join(backend.devices)} tensors, not {device_type}"
    return backend.reason_unusable(device_type)


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend that runs for `name` on `device`; a named one that cannot run is a ValueError."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if REGISTRY[candidate].unusable_on(device.type) is None:
                return REGISTRY[candidate]
        raise ValueError(f"no backend runs on {device.type} tensors")
    backend = REGISTRY[name]
    reason = backend.unusable_on(device.type)
    if reason is not None:
        raise ValueError(reason)
    return backend


def usable_backends(device: torch.device):
    """The names of every backend that runs on `device` here (tests and benchmarks use this)."""
    return [name for name, backend in REGISTRY.items() if backend.unusable_on(device.type) is None]
