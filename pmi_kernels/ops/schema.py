"""The loss options as the custom ops take them: named, typed schema arguments
(`bool pmi, float beta, float? clip, bool center, float temperature, float jsd_beta,
float? entry_clip`), None meaning no clip, never a 0 sentinel."""

from __future__ import annotations

from typing import Optional

from ..options import LossOptions


def loss_options(
    pmi: bool,
    beta: float,
    clip: Optional[float],
    center: bool,
    temperature: float,
    jsd_beta: float,
    entry_clip: Optional[float],
) -> LossOptions:
    """The options an op was given, back as LossOptions (checked again: an op may be called
    directly)."""
    return LossOptions(
        pmi=pmi, beta=beta, clip=clip, center=center, temperature=temperature, jsd_beta=jsd_beta, entry_clip=entry_clip
    )
