"""What the integrations read of a Hugging Face causal LM: its decoder and its lm_head.

fused_pmi_kl takes the decoder's final hidden states and the lm_head's weight and bias, so a
model whose logits are anything but lm_head(h) is refused here, once for every integration.
"""

from __future__ import annotations

import torch

# Config attributes of models whose logits are not lm_head(h), with the value that leaves them
# unchanged: a soft cap is off only when unset, a scale at 1 (Granite's logits_scaling=1).
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_scale": 1,
    "output_multiplier": 1,
    "lm_head_multiplier": 1,
    "logits_scaling": 1,
}


def decoder_and_head(model, key: str = "model"):
    """(decoder, lm_head) of a causal LM, plain or PEFT-wrapped (unwrap accelerate's and FSDP's
    wrappers first): the decoder returns the final hidden states (after the final norm), the
    lm_head turns them into logits. Under PEFT, `model.base_model` is the LoraModel, whose
    forward runs the whole LM and returns logits; `get_base_model().get_decoder()` is the
    decoder, with the adapter's layers inside it (switched off by `disable_adapter()` as for the
    whole model). `key` starts each error: the config key or argument that named the model."""
    get_base = getattr(model, "get_base_model", None)  # PEFT's PeftModel only
    base = get_base() if callable(get_base) else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is base:
        raise ValueError(f"{key}: {type(base).__name__} has no decoder (get_decoder()) to read hidden states from")
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"{key}: the lm_head must be a torch.nn.Linear, got {type(head).__name__} (fused_pmi_kl "
            "applies its weight and bias; leave lm_head out of a PEFT config's target_modules and "
            "modules_to_save)"
        )
    config = base.config.get_text_config()
    for name, identity in LOGIT_TRANSFORMS.items():
        if getattr(config, name, None) not in (None, identity):
            raise ValueError(
                f"{key}: {type(base).__name__} transforms its logits ({name}="
                f"{getattr(config, name)!r}); fused_pmi_kl computes plain lm_head(h)"
            )
    return decoder, head
