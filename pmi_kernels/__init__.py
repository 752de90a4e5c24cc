"""Fused kernels for on-policy self-distillation with the PMI target (Purified OPSD).

    fused_pmi_kl     loss and gradients from hidden states + lm_head, never holding [N, V]
    pmi_kl           the same loss from logit streams
    pmi_diagnostics  the decomposition of the teacher's signal, per position
    FusedPMIKLLoss, PMIKLLoss   the losses as modules (options in the constructor)

The loss is defined in docs/loss.md; `pmi_kernels.reference` is its plain-torch form.
"""

from .diagnostics import pmi_diagnostics
from .fused_linear import fused_pmi_kl
from .logits import pmi_kl
from .modules import FusedPMIKLLoss, PMIKLLoss

__all__ = ["fused_pmi_kl", "pmi_kl", "pmi_diagnostics", "FusedPMIKLLoss", "PMIKLLoss"]
__version__ = "0.1.0"
