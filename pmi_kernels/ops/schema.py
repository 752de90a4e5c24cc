"""The loss options as the custom ops take them: named, typed schema arguments
(`bool pmi, float beta, float? clip, bool center, float temperature, float jsd_beta,
float? entry_clip`), None meaning no clip, never a 0 sentinel."""

from __future__ import annotations

from typing import Dict, Optional, Union

from ..options import LossOptions


def loss_args(opts: LossOptions) -> Dict[str, Union[bool, float, None]]:
    """The options as the ops' keyword arguments."""
    return dict(
        pmi=opts.pmi,
        beta=opts.beta,
        clip=opts.clip,
        center=opts.center,
        temperature=opts.temperature,
        jsd_beta=opts.jsd_beta,
        entry_clip=opts.entry_clip,
    )


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
