"""The final hidden states of the rollout tokens in each context.

The token layout (the states at positions L - 1 ... L + T - 2 of prompt + rollout[:-1]) is
pmi_kernels.prompts' rollout_positions. These states are the final decoder output (after the
final norm); the lm_head is never applied here - fused_pmi_kl does that.
"""
from __future__ import annotations

from typing import List

import torch

from ..prompts import rollout_positions

KINDS = ("student", "teacher", "refonly")


def rollout_hidden(decoder, prompt: List[int], rollout: List[int], device) -> torch.Tensor:
    """[T, H]: the decoder's final hidden states that predict each rollout token."""
    ids = torch.tensor(prompt + rollout[:-1], device=device)[None]
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
    return hidden[rollout_positions(len(prompt), len(rollout))]


def trim_rollout(tokens: List[int], eos_id, pad_id) -> List[int]:
    """Generated ids up to and including the first EOS; padding dropped."""
    out = []
    for tok in tokens:
        if tok == eos_id:
            out.append(tok)
            break
        if tok != pad_id:
            out.append(tok)
    return out
